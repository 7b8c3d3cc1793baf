"""One GRPO step, ours against MiniMind's: peak memory of the loss step, rollout tokens/s, training tokens/s.

    python -m bench.rl                                   # the CPU size: small (26M), 1 prompt x 6, 64 + 512 tokens
    python -m bench.rl --prompts 2 --prompt_len 768 --gen_len 1024      # MiniMind's GRPO size (a GPU)
    python -m bench.rl --json out.json

The step is train/grpo.py's own `policy_loss` (policy log-probs with gradient, the frozen reference's without, the
CISPO loss, backward), run twice on the same rollout batch and the same weights, changing only how the log-probs are
taken:
  ours      rl.completion_logprobs: one forward, then ops.linear_logprobs on the hidden states of the completion
            positions, in vocabulary-sized chunks of at most 32 MiB of logits (kernels/linear_cross_entropy.py);
  minimind  MiniMind's get_per_token_logps: the logits of the last L + 1 positions (logits_to_keep), then per row a
            full log_softmax over the vocabulary and a gather, for the policy and the reference; on the torch
            kernels, as MiniMind trains.
--kernels is ours' backend: triton on a GPU; on a CPU `mixed` (the default there): torch blocks and the Triton
log-prob kernel under the interpreter, so both steps run the same blocks and the comparison isolates the log-prob
path (the interpreter makes ours' CPU training time slow: it is no speed claim).

The batch is a real rollout of the generation engine (minimind/generate.py): --prompts random prompts of
--prompt_len tokens, --group samples each at temperature 0.8, no end token, so every row generates --gen_len tokens
(MiniMind's worst case). Weights are random (bench.generate's: logits peaked like a trained model's).

Measured:
  peak memory  of one loss step (forward of policy and reference, loss, backward), beyond what was allocated before
               it (weights, the batch): on a GPU torch.cuda.max_memory_allocated; on a CPU every allocation and free
               of PyTorch's CPU allocator during the step, as torch.profiler records them (profile_memory), summed in
               time order, the peak of that running sum. Parameter gradients are allocated in the step both times.
               Also its log-prob part alone: the same step on hidden states computed beforehand (heads, log-softmax
               or linear_logprobs, loss, their backward), which is all that differs between the two.
  rollout tok/s   generated tokens / rollout time (ours; MiniMind's generate is not reproduced here).
  training tok/s  rows x sequence length / loss-step time, best of --repeats, each step.
"""
import argparse
import copy
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

from bench import report
from bench.generate import model_for, source
from kernels.backend import get_backend
from minimind.generate import SamplingConfig, rollout
from minimind.model import MiniMindForCausalLM
from train import grpo, rl

KERNELS = ("triton", "torch", "mixed")


def full_logits_logprobs(model, batch):
    """MiniMind's get_per_token_logps on a batch whose rows all have the prompt length P and L completion tokens:
    logits (N, L + 1, V) of the last L + 1 positions, the last dropped, a log_softmax per row, the targets gathered.
    Returns ((N, L) log-probs, aux loss)."""
    hidden, aux = model.model(batch["input_ids"])
    L = batch["targets"].shape[1]
    logits = model.lm_head(hidden[:, -(L + 1):])[:, :-1]
    rows = [row.log_softmax(dim=-1).gather(1, t[:, None]).squeeze(1) for row, t in zip(logits, batch["targets"])]
    return torch.stack(rows).float(), aux


def rollout_batch(model, args, device, autocast):
    """The GRPO micro-batch of a rollout of random prompts (every row exactly gen_len new tokens), and the
    rollout's generated tokens per second."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g).tolist()
    cfg = SamplingConfig(max_new_tokens=args.gen_len, temperature=0.8, top_p=1.0, top_k=0, eos_token_id=None)
    with torch.no_grad(), autocast():  # warm-up
        rollout(model, prompts, 1, SamplingConfig(max_new_tokens=2, eos_token_id=None), seeds=range(args.prompts))
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast():
        out = rollout(model, prompts, args.group, cfg, seeds=range(args.prompts * args.group))
    _sync(device)
    seconds = time.perf_counter() - t0
    assert bool(out.completion_mask.all()), "every row generates gen_len tokens"
    ids, _ = out.sequences()
    N, L = out.completions.shape
    sources = (args.prompt_len - 1 + torch.arange(L, device=ids.device)).expand(N, L)
    rewards = torch.randn(N, generator=g).to(device)
    batch = dict(input_ids=ids, sources=sources, targets=out.completions, mask=out.completion_mask.float(),
                 old_logprobs=out.logprobs, advantages=rl.group_advantages(rewards, args.group))
    return batch, N * L / seconds


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_step(policy, ref, batch, logprobs, autocast):
    """One GRPO loss step (train.grpo.policy_loss) and its backward; the parameter gradients are left set."""
    loss_args = SimpleNamespace(loss_type="cispo", beta=0.1, epsilon=0.2, epsilon_high=5.0)
    with autocast():
        loss, _ = grpo.policy_loss(policy, ref, batch, loss_args, logprobs=logprobs)
    loss.backward()
    return loss.detach()


def cpu_peak_bytes(fn):
    """Peak of the running sum of PyTorch CPU allocator allocations and frees while fn runs (torch.profiler's memory
    events, which it records on the thread that runs it, where a CPU backward runs too; the kineto results are the
    only place that lists each of them)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() ==
              torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def peak_bytes(fn, device):
    """Peak bytes allocated while fn runs beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(fn)


def head_only(model, batch, autocast):
    """A stand-in for model whose body returns its hidden states for batch, computed once (a leaf that wants a
    gradient when model does): the log-prob functions run on it measure the log-prob path alone."""
    with torch.no_grad(), autocast():
        hidden, aux = model.model(batch["input_ids"])
    hidden = hidden.detach().requires_grad_(model.lm_head.weight.requires_grad)
    return SimpleNamespace(model=lambda input_ids: (hidden, aux), lm_head=model.lm_head, ops=model.ops,
                           zero_grad=lambda set_to_none=True: setattr(hidden, "grad", None) or model.zero_grad(
                               set_to_none=set_to_none))


def measure(policy, ref, batch, logprobs, args, device, autocast):
    """{peak_MiB, step_s, training_tokens_per_s, loss} of the loss step with this log-prob function."""
    def step():
        policy.zero_grad(set_to_none=True)
        return loss_step(policy, ref, batch, logprobs, autocast)
    loss = step()  # warm-up
    times = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    policy.zero_grad(set_to_none=True)
    peak = peak_bytes(lambda: loss_step(policy, ref, batch, logprobs, autocast), device)
    tokens = batch["input_ids"].numel()
    return {"peak_MiB": peak / 2 ** 20, "step_s": min(times), "training_tokens_per_s": tokens / min(times),
            "loss": float(loss)}


def with_kernels(model, kernels):
    """The model's copy on a backend (mixed: the torch blocks and the triton log-prob op)."""
    out = MiniMindForCausalLM(model.config, kernels="torch" if kernels == "mixed" else kernels)
    out.load_state_dict(model.state_dict())
    if kernels == "mixed":
        out.ops = SimpleNamespace(**{**vars(out.ops), "linear_logprobs": get_backend("triton").linear_logprobs})
    return out.to(next(model.parameters()).device).train()


def compact(doc):
    """The suite's summary (bench/gpu_suite.sh): both steps, the rollout's rate and the peak-memory ratios."""
    rows = [{"step": name, **r, "part": doc["logprob_part"][name]["peak_MiB"]} for name, r in doc["results"].items()]
    table = report.markdown_table(rows, [("step", "step"), ("peak MiB", "peak_MiB"), ("step s", "step_s"),
                                         ("train tok/s", "training_tokens_per_s"), ("log-prob part MiB", "part")])
    return "\n".join([
        f"## One GRPO step, ours vs MiniMind's full-logits log-probs (bench.rl, {doc['device']})", "",
        f"{doc['preset']}, {doc['prompts']} prompt(s) x {doc['group']}, {doc['prompt_len']} + {doc['gen_len']} "
        f"tokens; ours on --kernels {doc['kernels']}, minimind on torch", "", table, "",
        f"rollout {report.fmt(doc['rollout_tokens_per_s'])} generated tokens/s; peak memory minimind / ours: the "
        f"loss step {doc['peak_ratio']:.2f}x, its log-prob part {doc['logprob_part_peak_ratio']:.2f}x "
        f"({doc['memory_measured_by']})"])


def main(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="tiny, small (26M, MiniMind2's), base, moe (default "
                   "%(default)s)")
    p.add_argument("--prompts", type=int, default=2 if gpu else 1, help="prompts per step (MiniMind: 2)")
    p.add_argument("--group", type=int, default=6, help="samples per prompt (MiniMind: 6)")
    p.add_argument("--prompt_len", type=int, default=768 if gpu else 64, help="tokens per prompt (MiniMind: 768)")
    p.add_argument("--gen_len", type=int, default=1024 if gpu else 512, help="tokens generated per row (MiniMind: "
                   "1024)")
    p.add_argument("--kernels", choices=KERNELS, default="triton" if gpu else "mixed",
                   help="ours' backend (mixed: torch blocks, the Triton log-prob kernel; the CPU default)")
    p.add_argument("--repeats", type=int, default=2, help="timed loss steps per variant; the best counts")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: steady numbers on a shared machine, as bench.generate)")
    p.add_argument("--device", default="cuda" if gpu else "cpu", help="where it runs")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.kernels != "torch" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.rl: on a CPU the Triton kernel runs under the interpreter: run with TRITON_INTERPRET=1 "
                 "(or --kernels torch)")
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)

    base = model_for(args.preset, torch.device("cpu")).to(device).train()  # fp32 weights, bf16 autocast on a GPU
    ours, theirs = with_kernels(base, args.kernels), with_kernels(base, "torch")
    refs = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in (("ours", ours), ("minimind", theirs))}
    N, T = args.prompts * args.group, args.prompt_len + args.gen_len
    V = base.config.vocab_size
    print(f"measuring {source()} on {device}: {args.preset} (vocab {V}), {args.prompts} prompt(s) x {args.group}, "
          f"{args.prompt_len} + {args.gen_len} tokens; ours on --kernels {args.kernels}, minimind on torch; "
          f"(N, L, V) fp32 logits would be {N * args.gen_len * V * 4 / 2 ** 20:.0f} MiB")
    batch, rollout_tps = rollout_batch(theirs, args, device, autocast)
    models = {"ours": (ours, refs["ours"], rl.completion_logprobs),
              "minimind": (theirs, refs["minimind"], full_logits_logprobs)}
    results = {name: measure(policy, ref, batch, fn, args, device, autocast)
               for name, (policy, ref, fn) in models.items()}
    heads = {name: measure(head_only(policy, batch, autocast), head_only(ref, batch, autocast), batch, fn, args,
                           device, autocast) for name, (policy, ref, fn) in models.items()}
    ratio = results["minimind"]["peak_MiB"] / max(results["ours"]["peak_MiB"], 1e-9)
    head_ratio = heads["minimind"]["peak_MiB"] / max(heads["ours"]["peak_MiB"], 1e-9)
    print(f"rollout: {rollout_tps:.0f} generated tokens/s ({N} rows x {args.gen_len})")
    print(f"{'step':9s} {'peak MiB':>9s} {'step s':>8s} {'train tok/s':>12s} {'loss':>10s} {'log-prob part MiB':>18s}")
    for name, r in results.items():
        print(f"{name:9s} {r['peak_MiB']:9.1f} {r['step_s']:8.2f} {r['training_tokens_per_s']:12.0f} "
              f"{r['loss']:10.5f} {heads[name]['peak_MiB']:18.1f}")
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocator events"
    print(f"peak memory, minimind / ours: the loss step {ratio:.2f}x, its log-prob part (the heads, log-softmax or "
          f"linear_logprobs, loss and their backward, on given hidden states) {head_ratio:.2f}x ({how})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source(), "device": str(device), "memory_measured_by": how, **vars(args),
                       "rollout_tokens_per_s": rollout_tps, "peak_ratio": ratio, "logprob_part_peak_ratio":
                       head_ratio, "results": results, "logprob_part": heads}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
