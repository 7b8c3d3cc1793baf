"""The training engine: one loop that every stage (pretrain, sft, lora, dpo, distill, reason, grpo, ppo) runs.

A stage is a recipe (`Stage`): which data, which loss, which weights to start from and which to write. The engine
does the rest, once: flags, precision, gradient accumulation, clipping, AdamW, the learning-rate schedule, DDP or
DeepSpeed, torch.compile, checkpoints, resume, a clean stop on SIGINT/SIGTERM, and what a run reports (its data, the
progress bar, the metrics log, where the weights went: train/metrics.py).

One optimizer step, with A = --accumulation_steps micro-batches per process and W processes:

    loss_step = mean over the W*A micro-batches of the global batch of (the stage's mean loss of that micro-batch)

Each process backpropagates loss_micro / A (DDP averages the gradients over the W processes). Because the loader
composes global batches independently of W (rank r takes global batches r, r+W, ...), W processes with A
micro-steps each take exactly the step one process takes with W*A micro-steps. We average per-micro-batch means
rather than normalising by the global token count: it needs no look-ahead over the micro-batches of a step and is
what MiniMind2 does; the price is that a token in a short micro-batch weighs a little more than in a long one.

Learning rate at step s of S (MiniMind2's cosine, plus the warmup MiniMind2 declares but never applies):

    cosine(s) = lr/10 + 0.5 * lr * (1 + cos(pi * s / S));  lr(s) = cosine(s) * min(1, (s + 1) / warmup_iters)

Around it: train/flags.py (every stage's flags and their checks), train/checkpoint.py (weight files,
resume checkpoints), train/flops.py (the FLOPs count behind MFU), train/metrics.py (what a run reports),
train/distributed.py (DDP) and train/deepspeed_setup.py.

--compile compiles every decoder block in place (`compile_blocks`: nn.Module.compile per block, so state-dict keys
do not change) of the trained model, after the stage's prepare (LoRA adapters are inside the blocks by then), and
of every frozen model (run.add_frozen). Whatever a stage calls (forward, token_logprobs, model.model), the blocks
run compiled; the embedding, the final norm and the loss head stay eager (on the triton backend the head is one
fused kernel anyway). Not with DeepSpeed. --compile_mode (implies --compile) picks torch.compile's mode:
reduce-overhead records each block's kernels as CUDA graphs and replays them (a step begins a new graph
generation), which removes most per-kernel launch cost where shapes are static (packed rows); untested on a GPU.
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from minimind.model import MiniMindForCausalLM
from minimind.weights import config_path, model_card
from train import distributed
from train.checkpoint import (atomic_save, atomic_write_text, check_resume, fp16_state_dict, load_weights,
                              resolve_weights, resume_source, rng_state, set_rng_state, weight_file_name)
from train.flags import CHAT_KINDS, DTYPES, ConfigError, check_args, config_from_args, parse_flags
from train.flops import peak_flops, run_flops_per_token
from train.metrics import (MetricsLog, bar_text, data_summary, finish_summary, jsonable_flags, log_step,
                           progress_bar, schedule_summary)


@dataclass
class Stage:
    """A training recipe: which data, which loss, which weights to start from and write (train/sft.py is a small
    example). Only name, data_kind, save_prefix and loss are required."""
    name: str               # log names, {out_dir}/{name}_metrics.jsonl, wandb run name
    data_kind: str          # minimind.data.build_loader kind: "pretrain" | "sft" | "dpo" | "reason" | "rl"
    save_prefix: str        # weight file {out_dir}/{save_prefix}_{hidden}[_moe].pth ("full_sft", "rlhf", ...)
    loss: Callable          # loss(model, batch, run) -> (mean loss of the micro-batch, {metric: scalar}); run under
                            # autocast, batch already on the device; call any method of model (DDP still syncs)
    defaults: dict = field(default_factory=dict)  # argparse defaults of this stage (MiniMind2's recipe table)
    minimind3_defaults: Optional[dict] = None   # minimind-3's recipe row: the defaults under --preset minimind3 /
                                                # minimind3-moe for flags not given (flags.parse_flags); None: no
                                                # minimind-3 recipe for this stage, `defaults` stay
    add_args: Optional[Callable] = None         # add_args(parser): stage-only flags
    prepare: Optional[Callable] = None          # prepare(model, run) -> model, after --from_weight is loaded and
                                                # before optimizer / resume / DDP / compile (LoRA wrapping; frozen
                                                # models via run.add_frozen, which compiles them under --compile
                                                # and counts them in MFU); runs again on resume, so deterministic
    trainable: Optional[Callable] = None        # trainable(model) -> parameters to train (default: all), or
                                                # param groups, each clipped on its own, lr times its "lr_scale"
    weights: Optional[Callable] = None          # weights(model, run) -> state dict to save (default: fp16 model)
    weights_path: Optional[Callable] = None     # weights_path(run) -> Path (default from save_prefix)
    tokens: Optional[Callable] = None           # tokens(batch) -> useful tokens, for tokens/s and MFU
    flops_per_token: Optional[Callable] = None  # flops_per_token(model, seq_len): the trained model's forward +
                                                # backward, for MFU (default 6N + 12LdT); frozen models are added
    check_args: Optional[Callable] = None       # check_args(args): stage flags, before anything is built
    loader_options: Optional[Callable] = None   # loader_options(args, tokenizer) -> more build_loader keywords
    make_steps: Optional[Callable] = None       # make_steps(batches, run) -> iterable of optimizer steps, each a
                                                # list of micro-batches (dicts on the device), made from the A
                                                # loader batches of one step (RL: rollouts; PPO: several update
                                                # passes); run.step_metrics holds the last step's metric sums.
                                                # Its time is reported apart (rollout_s); default: [batches]


# --------------------------------------------------------------------------------------------------- the run

class Run:
    """What a stage's loss / prepare / weights functions see: flags, devices, tokenizer, frozen models."""

    def __init__(self, args, config, tokenizer, device, dtype, dist):
        self.args, self.config, self.tokenizer = args, config, tokenizer
        self.device, self.dtype, self.dist = device, dtype, dist
        self.rank, self.world_size, self.is_main = dist.rank, dist.world_size, dist.is_main
        self.step, self.epoch = 0, 0
        self.extras = {}
        self.out_dir = Path(args.out_dir)
        self.model = self.loader = None  # the trained model (after prepare, unwrapped) and the data loader
        self.step_metrics = {}  # the metric sums of the last optimizer step (what make_steps may look at)
        self._bar, self._outside_step = None, set()

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def log(self, msg):
        if self.is_main:
            (self._bar.write if self._bar is not None else print)(msg)

    def add_frozen(self, name, model, in_step=True):
        """Register a model the stage runs without training it (a DPO reference, a teacher): eval mode, no
        gradients, blocks compiled under --compile; run.extras[name]. in_step: the loss runs it, so MFU counts
        one forward of it per token (False: it runs outside the step, in make_steps, e.g. PPO's reference)."""
        model.eval().requires_grad_(False)
        if self.args.compile:
            compile_blocks(model, **compile_options(self.args))
        self.extras[name] = model
        if not in_step:
            self._outside_step.add(name)
        return model

    def frozen_models(self):
        """The models in run.extras (registered there by add_frozen) that the loss runs: MFU counts one forward of
        each."""
        return [m for k, m in self.extras.items() if isinstance(m, nn.Module) and k not in self._outside_step]

    def build_model(self, config=None, weights=None, kernels=None, flag="--from_weight"):
        """A MiniMindForCausalLM on this run's device (fp32 params); weights: None | stage prefix | path, given by
        the command-line `flag` (named in errors)."""
        config = config or self.config
        model = MiniMindForCausalLM(config, kernels=kernels or self.args.kernels, attn=self.args.attn)
        path = resolve_weights(weights, self.out_dir, config, flag) if weights else None
        if path is not None:
            load_weights(model, path)
        return model.to(self.device)


class StageStep(nn.Module):
    """What DDP / DeepSpeed wrap: forward(batch) = the stage's loss on the model, under autocast. Any method of the
    model the loss calls is inside this forward, so gradient synchronisation covers it."""

    def __init__(self, model, loss_fn, run):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.__dict__["run"] = run  # not a submodule

    def forward(self, batch):
        with self.run.autocast():
            return self.loss_fn(self.model, batch, self.run)


def lr_at(step, total, lr, warmup):
    """MiniMind2's cosine from lr to lr/10 (+ lr/10 floor), times a linear warmup over the first `warmup` steps."""
    cosine = lr / 10 + 0.5 * lr * (1 + math.cos(math.pi * step / max(total, 1)))
    return cosine * min(1.0, (step + 1) / warmup) if warmup > 0 else cosine


# Every compiled block of every model shares one code object (DecoderLayer.forward) and so one cache of compiled
# variants: training / no-grad x first layer (no pending residual) / the others x fixed / dynamic length x model
# width. torch's default limit of 8 would send a DPO or distillation run back to eager part way through.
RECOMPILE_LIMIT = 64


def _blocks(model):
    from minimind.model import MiniMindModel
    return [block for m in model.modules() if isinstance(m, MiniMindModel) for block in m.layers]


def compile_blocks(model, **compile_kwargs):
    """torch.compile each decoder block of every MiniMind body in `model` (a MiniMindForCausalLM, or a module holding
    several, like PPO's actor and critic) in place (nn.Module.compile; compile_kwargs go to torch.compile), so every
    entry point (forward, token_logprobs, model.model) runs compiled blocks and the state-dict keys stay as they
    are. Returns model."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    for block in _blocks(model):
        block.compile(**compile_kwargs)
    return model


@contextlib.contextmanager
def eager_blocks(model):
    """Inside, the blocks compile_blocks compiled run uncompiled: the RL stages generate their rollouts so (a decode
    step's batch shrinks as rows finish and its cache span grows every step, which would keep recompiling, for
    one-token forwards where compilation gains little); their training forward and backward run compiled."""
    compiled = [(b, b._compiled_call_impl) for b in _blocks(model) if getattr(b, "_compiled_call_impl", None)]
    for block, _ in compiled:
        block._compiled_call_impl = None  # what nn.Module.__call__ checks (set by nn.Module.compile)
    try:
        yield
    finally:
        for block, impl in compiled:
            block._compiled_call_impl = impl


def compile_options(args) -> dict:
    """torch.compile keyword arguments of the flags: the --compile_mode, when one was given."""
    mode = getattr(args, "compile_mode", None)
    return {"mode": mode} if mode else {}


def default_tokens(batch) -> int:
    masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(batch["input_ids"].numel())


def _seq_len(batch) -> int:
    for k, v in batch.items():
        if k.endswith("input_ids"):
            return v.shape[-1]
    return next(iter(batch.values())).shape[-1]


def _to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class _StopRequest:
    """SIGINT/SIGTERM -> finish the current step, save a resume checkpoint, exit. A second signal aborts."""

    def __init__(self):
        self.requested, self._old = False, {}

    def install(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving a resume checkpoint after this step "
              f"(signal again to abort)", file=sys.stderr, flush=True)

    def uninstall(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _min_over_processes(n: int, dist, device) -> int:
    if not dist.enabled:
        return n
    import torch.distributed as tdist
    t = torch.tensor([n], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item())


def grad_scaler(device):
    try:
        return torch.amp.GradScaler(device.type)
    except (AttributeError, TypeError):  # torch < 2.3
        return torch.cuda.amp.GradScaler()


# --------------------------------------------------------------------------------------------------- main


# exit status of a command-line run stopped before its last step (SIGINT, SIGTERM, --stop_after) after saving its
# resume state: not 0, so `pretrain && sft` does not go on with unfinished weights (130 = 128 + SIGINT, as shells do)
STOPPED_EXIT_STATUS = 130


def main(stage: Stage, argv=None) -> dict:
    """Parse the flags (argv=None: the command line) and train. On the command line a ConfigError or DataError prints
    as one line (exit 2) and a stopped run exits with STOPPED_EXIT_STATUS; called with an argv list, the error is
    raised and the result (its "interrupted" set) returned."""
    parser, args = parse_flags(stage, argv)
    from minimind.data import DataError
    try:
        result = train(stage, args)
    except (ConfigError, DataError) as e:
        if argv is not None:
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)  # no usage block: it has dozens of flags (see --help)
        sys.exit(2)
    if argv is None and result["interrupted"]:
        sys.exit(STOPPED_EXIT_STATUS)
    return result


def train(stage: Stage, args) -> dict:
    """Train with parsed flags; returns the result dict (see the stage files; flops_per_token: the MFU count of a
    token at --max_seq_len)."""
    device = check_args(args, stage)
    dist = distributed.init(device.type, need_group=bool(args.deepspeed))
    set_local_rank = args.deepspeed and "LOCAL_RANK" not in os.environ  # DeepSpeed insists on it
    if set_local_rank:
        os.environ["LOCAL_RANK"] = "0"
    finished = False
    try:
        result = _train(stage, args, device, dist)
        finished = True
        return result
    finally:
        distributed.shutdown(dist, finished)
        if set_local_rank:
            os.environ.pop("LOCAL_RANK", None)


def train_step(wrapped, micro_batches, optimizer, params, lr, *, grad_clip=1.0, scaler=None, ddp=None,
               ds_engine=None):
    """ONE optimizer step, the only one there is: the engine's loop and bench/throughput.py both call it.

    For each of the A micro-batches (dicts of tensors already on the device): loss, metrics = wrapped(batch) (a
    StageStep, possibly inside DDP or DeepSpeed), backward of loss / A (through the GradScaler for fp16); DDP
    syncs gradients on the last micro-batch only. Then unscale, clip the gradient norm of `params` to grad_clip
    (params: a list of tensors, or of param-group dicts, each group clipped on its own), set the learning rate
    (times a group's "lr_scale"), AdamW step, zero_grad. Returns (mean loss over the micro-batches (0-dim tensor),
    {metric: sum over micro-batches}, grad norm or None (with groups, the norm of all of them)).
    """
    A = len(micro_batches)
    loss_sum, metric_sums = None, {}
    for micro, batch in enumerate(micro_batches):
        if ds_engine is not None:
            loss, metrics = ds_engine(batch)
            ds_engine.backward(loss)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            ds_engine.step()
        else:
            sync = ddp is None or micro == A - 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                loss, metrics = wrapped(batch)
                scaled = loss / A
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
    grad_norm = None
    if ds_engine is None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip > 0:
            groups = [g["params"] for g in params] if params and isinstance(params[0], dict) else [params]
            norms = [torch.nn.utils.clip_grad_norm_(group, grad_clip) for group in groups]
            grad_norm = norms[0] if len(norms) == 1 else torch.stack(norms).norm()
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss_sum / A, metric_sums, grad_norm


def _train(stage, args, device, dist):
    from minimind.data import build_loader, default_ratios
    from minimind.tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ConfigError(f"--tokenizer {args.tokenizer or '(bundled)'}: {e}") from None
    config = config_from_args(args, tokenizer.vocab_size)
    run = Run(args, config, tokenizer, device, dtype, dist)
    out_dir = run.out_dir
    start_weights = resolve_weights(args.from_weight, out_dir, config)
    weights_path = (stage.weights_path(run) if stage.weights_path
                    else out_dir / weight_file_name(args.save_weight, config))
    # the resume state lives beside the weight file it belongs to (so two LoRA adapters never share one)
    resume_path = weights_path.with_name(weights_path.stem + ("_resume_ds" if args.deepspeed else "_resume.pt"))
    resume_from = resume_source(args, resume_path)

    augment = {}
    if stage.data_kind in CHAT_KINDS:  # MiniMind's defaults for the tokenizer's chat format where not given
        names = ("add_system_ratio", "drop_empty_think_ratio")
        for name, default in zip(names, default_ratios(tokenizer.chat_format)):
            if getattr(args, name) is None:
                setattr(args, name, default)
            augment[name] = getattr(args, name)
    if stage.loader_options:
        augment.update(stage.loader_options(args, tokenizer))
    loader = build_loader(stage.data_kind, args.data_path, tokenizer, max_seq_len=args.max_seq_len,
                          batch_size=args.batch_size, seed=args.seed, rank=dist.rank, world_size=dist.world_size,
                          pack=not getattr(args, "no_pack", False), skip_bad_records=args.skip_bad_records,
                          shuffle=args.shuffle, drop_last=args.shuffle,
                          markers=getattr(args, "pretrain_markers", "auto"), **augment)
    run.loader = loader
    steps_per_epoch = _min_over_processes(len(loader) // args.accumulation_steps, dist, device)
    if steps_per_epoch < 1:
        raise ConfigError(f"--data_path {args.data_path} gives {len(loader)} batches of {args.batch_size} per "
                          f"process per epoch, fewer than --accumulation_steps {args.accumulation_steps}")
    if run.is_main:
        if args.recipe:
            run.log(args.recipe)
        run.log(data_summary(args.data_path, loader.stats(), dist.world_size))

    model = MiniMindForCausalLM(config, kernels=args.kernels, attn=args.attn)
    if args.init == "minimind2":
        model.init_minimind2_(args.seed)
    if start_weights is not None:
        load_weights(model, start_weights)
    model.to(device)
    if stage.prepare:
        model = stage.prepare(model, run)
    run.model = model
    trainable = list(stage.trainable(model)) if stage.trainable else [p for p in model.parameters()]
    keep = {id(p) for g in trainable for p in (g["params"] if isinstance(g, dict) else [g])}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)

    state = None
    if resume_from is not None and not args.deepspeed:
        state = torch.load(resume_from, map_location="cpu", weights_only=False)
        check_resume(state, resume_from, stage, args, config)
        model.load_state_dict(state["model"])
    elif args.from_resume == "1" and resume_from is None:
        run.log(f"no resume checkpoint at {resume_path}; starting from the beginning")

    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    scaler = grad_scaler(device) if dtype == torch.float16 and not args.deepspeed else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    if args.compile:
        compile_blocks(model, **compile_options(args))  # after prepare: LoRA adapters are in the blocks by then
    cuda_graphs = args.compile_mode == "reduce-overhead"
    step_module = StageStep(model, stage.loss, run)
    ds_engine = ddp = None
    if args.deepspeed:
        from train import deepspeed_setup
        ds_engine, optimizer = deepspeed_setup.initialize(step_module, trainable, optimizer, args, dist,
                                                          resume_from)
        if resume_from is not None:
            state = deepspeed_setup.load_resume(ds_engine, resume_from, dist)
            check_resume(state, resume_from, stage, args, config)
        wrapped = ds_engine
    elif dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped = ddp
    else:
        wrapped = step_module

    step, epoch, epoch_batches, tokens_total, seconds_before = 0, 0, 0, 0, 0.0
    if state is not None:
        step, epoch, epoch_batches = state["step"], state["epoch"], state["epoch_batches"]
        tokens_total, seconds_before = state.get("tokens", 0), state.get("elapsed_s", 0.0)
        try:
            loader.load_state_dict(state["loader"])
        except ValueError as e:  # another data file, --seed or packing: the saved position means other batches
            raise ConfigError(f"--from_resume {resume_from} does not fit --data_path {args.data_path} "
                              f"--seed {args.seed}: {e}") from None
        set_rng_state(state["rng"])
        run.log(f"resumed from {resume_from} at step {step} (epoch {epoch}, "
                f"{epoch_batches} global batches into it; saved by {state['world_size']} process(es))")
    tokens_before = tokens_total
    W, A = dist.world_size, args.accumulation_steps
    # Steps still to do: the rest of this epoch from the global position, then whole epochs.
    left_this_epoch = _min_over_processes((len(loader) * W - epoch_batches) // W // A, dist, device)
    total_steps = step + left_this_epoch + (args.epochs - epoch - 1) * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    # {stage}_metrics.jsonl, or {save_weight}_metrics.jsonl for a run that writes another weight file than the
    # stage's (a second SFT in the same folder keeps the first one's log)
    log_name = stage.name if args.save_weight == stage.save_prefix else args.save_weight
    metrics_log = MetricsLog(out_dir / f"{log_name}_metrics.jsonl", args, stage.name, dist.is_main,
                             resume_step=None if state is None else step)
    peak = peak_flops(device, args.peak_tflops)
    flops_fn = run_flops_per_token(stage, model, run)
    tokens_fn = stage.tokens or default_tokens
    weights_fn = stage.weights or (lambda m, r: fp16_state_dict(m))

    def save(final=False):
        if dist.is_main:
            atomic_save(weights_fn(model, run), weights_path)
            # MiniMind2's weight file is a bare state dict; shape and tokenizer go beside it (minimind.weights)
            card = model_card(config, run.tokenizer, args.tokenizer)
            atomic_write_text(json.dumps(card, indent=1) + "\n", config_path(weights_path))
        resume_state = dict(format="minimind-triton-resume/1", stage=stage.name, step=step, epoch=epoch,
                            epoch_batches=epoch_batches, tokens=tokens_total, loader=loader.state_dict(),
                            elapsed_s=seconds_before + time.perf_counter() - t_start,
                            rng=rng_state(), config=config.to_dict(), world_size=W, finished=final,
                            args=jsonable_flags(args))
        if ds_engine is not None:
            from train import deepspeed_setup
            deepspeed_setup.save_resume(ds_engine, resume_path, resume_state, dist)
        elif dist.is_main:
            resume_state.update(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                scaler=scaler.state_dict() if scaler is not None else None)
            atomic_save(resume_state, resume_path)

    stop = _StopRequest().install()
    run.log(schedule_summary(args.learning_rate, args.warmup_iters, total_steps))
    bar = progress_bar(total_steps, step, stage.name, dist.is_main)
    run._bar = bar
    losses, run_steps, t_start, interrupted = [], 0, time.perf_counter(), False
    loss_val = float("nan")
    window = dict(t=time.perf_counter(), tokens=0, flops=0.0)
    if stage.make_steps:
        window["aside_s"] = 0.0  # the time spent making the steps (rollouts), kept out of tokens/s and MFU
    aside_total = 0.0
    model.train()
    try:
        while step < total_steps and epoch < args.epochs:
            it = iter(loader)
            steps_here = min(left_this_epoch, total_steps - step)
            for _ in range(steps_here):
                run.step, run.epoch = step, epoch
                lr = lr_at(step, total_steps, args.learning_rate, args.warmup_iters)
                batches = [next(it) for _ in range(A)]
                counted = batches if stage.make_steps is None else []  # on the host, before the copy
                t_aside = time.perf_counter()
                updates = ([[_to_device(b, device) for b in batches]] if stage.make_steps is None
                           else stage.make_steps([_to_device(b, device) for b in batches], run))
                loss_sum, metric_sums, n_micro = 0.0, {}, 0
                for micro_batches in updates:  # one optimizer step each
                    aside_s = time.perf_counter() - t_aside
                    for batch in counted or micro_batches:
                        n_tok = tokens_fn(batch)
                        window["tokens"] += n_tok
                        window["flops"] += n_tok * flops_fn(_seq_len(batch))
                        tokens_total += n_tok * W
                    if cuda_graphs:  # a new iteration: the graphs may overwrite the previous step's outputs
                        torch.compiler.cudagraph_mark_step_begin()
                    loss_mean, run.step_metrics, grad_norm = train_step(
                        wrapped, micro_batches, optimizer, trainable, lr, grad_clip=args.grad_clip, scaler=scaler,
                        ddp=ddp, ds_engine=ds_engine)
                    loss_sum, n_micro = loss_sum + loss_mean * len(micro_batches), n_micro + len(micro_batches)
                    for k, v in run.step_metrics.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + v
                    t_aside = time.perf_counter()
                    if stage.make_steps:
                        window["aside_s"] += aside_s
                        aside_total += aside_s
                if stage.make_steps:  # the generator's own end (e.g. PPO's early stop)
                    window["aside_s"] += time.perf_counter() - t_aside
                    aside_total += time.perf_counter() - t_aside
                loss_mean = loss_sum / n_micro
                step += 1
                run_steps += 1
                epoch_batches += W * A
                stopping = distributed.any_process(
                    stop.requested or (args.stop_after and run_steps >= args.stop_after), dist, device)
                if step % args.log_interval == 0 or step == total_steps or stopping:
                    loss_val, record = log_step(step, epoch, lr, loss_mean, metric_sums, n_micro, grad_norm,
                                                window, peak, W, dist, t_start - seconds_before)
                    losses.append([step, loss_val])
                    metrics_log.write(record)
                    if bar is not None:
                        bar.set_postfix_str(bar_text(record))
                if bar is not None:
                    bar.update(1)
                if stopping:
                    interrupted = True
                    break
                if step % args.save_interval == 0 and step < total_steps:
                    save()
            if interrupted:
                break
            if step >= total_steps:
                break
            epoch += 1
            epoch_batches = 0
            left_this_epoch = steps_per_epoch
            loader.set_epoch(epoch)
        save(final=not interrupted)
        distributed.barrier(dist)  # leave together: no process tears the group down while another still saves
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        metrics_log.close()
    seconds = time.perf_counter() - t_start
    if interrupted:
        run.log(f"stopped at step {step}; resume with --from_resume 1 (state in {resume_path})")
    result = dict(stage=stage.name, weights_path=str(weights_path), resume_path=str(resume_path),
                  metrics_path=str(metrics_log.path), steps=step, total_steps=total_steps, final_loss=loss_val,
                  losses=losses, tokens=tokens_total, seconds=seconds, flops_per_token=flops_fn(args.max_seq_len),
                  tokens_per_s=(tokens_total - tokens_before) / seconds if seconds > 0 else 0.0,  # this run's
                  rollout_s=aside_total, interrupted=interrupted, model=model)
    if not interrupted:
        run.log(finish_summary(result))
    return result
