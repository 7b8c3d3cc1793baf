"""End-to-end training throughput: one real optimizer step of the engine, timed, for each preset and variant.

    python -m bench.throughput [--preset small|base|moe|minimind3|minimind3-moe|all] [--seq_len 512 [1024]]
                               [--batch_size N]
                               [--variants minimind2 torch torch+compile liger triton triton+compile] [--out DIR]
    python -m bench.throughput --cpu-smoke --out DIR     # tiny models on the CPU, to prove the harness (labelled CPU)

The step is train/engine.py's `train_step`, the same function the engine's loop calls: the stage's loss
(train.pretrain.lm_loss) through engine.StageStep under the engine's autocast, backward (through the GradScaler for
fp16), unscale, clip_grad_norm_ 1.0, AdamW (fused on CUDA), zero_grad. TrainStep below only builds its pieces.

Variants (same step, configured differently):
    minimind2       MiniMind2's trainer: torch kernels (full fp32 logits for the loss, per-expert MoE loop), eager,
                    fp16 autocast + GradScaler, one document per row padded to seq_len (pads get no loss; like
                    MiniMind2, no attention mask: pads sit after the text, so causal attention keeps them out).
                    It keeps the engine's fused AdamW (MiniMind2's default AdamW is slower): speedups understate.
                    For the minimind-3 presets it is minimind-3's trainer, the same but in bf16 autocast without the
                    GradScaler (minimind-3's train scripts honour --dtype, default bfloat16).
    torch           torch kernels, bf16 autocast, packed rows (no padding)
    torch+compile   the same with every decoder block under torch.compile (engine.compile_blocks, the engine's
                    --compile)
    liger           the liger backend (when liger-kernel is installed), bf16, packed
    triton          our Triton kernels, bf16, packed
    triton+compile  the same with compiled blocks

Padding (minimind2 only): row lengths are drawn uniformly with mean (1 - pad_fraction) * seq_len (--pad_fraction,
default 0.5: MiniMind's pretrain_hq keeps texts under 512 characters, about 1.23 characters per token with its
tokenizer (measured on Chinese prose), so rows hold at most ~420 of 512 tokens and on average about half;
an assumption, stated in every report; --pad_fraction_from FILE measures it on real data through minimind.data).
Useful tokens = non-pad tokens; the packed variants have no padding.

Timing: `warmup` steps (compilation, autotuning, allocator warm-up; the first is reported as first_step_s), then
the median over `repeats` steps, each between two torch.cuda.synchronize() calls. The batch is on the device
already (data loading is not timed). Peak memory: torch.cuda.max_memory_allocated over the timed steps.
fp16 rows count the timed steps whose GradScaler found an overflow and skipped AdamW (fp16_skipped_steps; the
tables flag any): such a step is cheaper than a real one, which would flatter the minimind2 reference.

MFU (the engine's formula, engine.default_flops_per_token): flops/token = 6 * N_matmul + 12 * L * d_attn * T,
N_matmul = weights of every matmul a token goes through (attention, MLP or shared + top-k experts, lm_head),
12 * L * d_attn * T = QK^T and AV forward + backward; MFU = useful tokens/s * flops/token / peak, peak =
engine.peak_flops(device) (the datasheet's dense bf16 rate: 989 TFLOP/s for an H200). Padding shows as lost MFU.
Speedups are ratios of useful tokens/s against the minimind2 step of the same preset and sequence length in the
same run; "same-token speedup" compares processed (padded) tokens/s, i.e. what the kernels alone buy.
"""
import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from bench import report
from minimind.config import PRESETS, MiniMindConfig


@dataclass(frozen=True)
class Variant:
    name: str
    kernels: str
    dtype: str        # engine.DTYPES key
    compile: bool
    padded: bool


VARIANTS = {v.name: v for v in (
    Variant("minimind2", "torch", "fp16", False, True),
    Variant("torch", "torch", "bf16", False, False),
    Variant("torch+compile", "torch", "bf16", True, False),
    Variant("liger", "liger", "bf16", False, False),
    Variant("triton", "triton", "bf16", False, False),
    Variant("triton+compile", "triton", "bf16", True, False),
)}
DEFAULT_ORDER = ("minimind2", "torch", "triton", "triton+compile", "torch+compile", "liger")
# MiniMind2's pretrain batch (32 x 512 = 16,384 tokens); at 1024 tokens the same tokens per step.
DEFAULT_TOKENS_PER_STEP = 16384
COMPILE_SECONDS_NEEDED = 60  # a compile variant is not started with less of --budget_s left


# "all" in this order, cheapest first under a time budget (minimind-3: 64M parameters; its MoE 64M active)
PRESET_ORDER = ("small", "moe", "minimind3", "minimind3-moe", "base")


def tiny_config(preset):
    """The CPU smoke run's model: the preset's structure (dense / MoE; MiniMind2's 4 / 2 heads, minimind-3's
    8 / 4 heads with q/k norm) at toy width."""
    heads = dict(head_dim=16) if PRESETS[preset].get("qk_norm") else dict(num_attention_heads=4, num_key_value_heads=2)
    return MiniMindConfig.from_preset(preset, hidden_size=64, num_hidden_layers=2, vocab_size=256,
                                      intermediate_size=96, **heads)


def row_lengths(batch, seq_len, pad_fraction, generator):
    """Row lengths (batch,) uniform with mean (1 - pad_fraction) * seq_len, each in [1, seq_len]."""
    mean = (1 - pad_fraction) * seq_len
    lo, hi = (2 * mean - seq_len, seq_len) if pad_fraction <= 0.5 else (1, 2 * mean)
    u = torch.rand(batch, generator=generator)
    return (lo + u * (hi - lo)).round().clamp(1, seq_len).long()


def padding_fraction_of(path, seq_len):
    """Share of pad tokens when `path` (pretrain JSON Lines) is laid out one document per row, padded to seq_len,
    as MiniMind2 trains (minimind.data's pack=False loader)."""
    from minimind.data import build_loader
    from minimind.tokenizer import load_tokenizer
    loader = build_loader("pretrain", path, load_tokenizer(), max_seq_len=seq_len, batch_size=1, pack=False)
    return float(loader.stats()["padding_fraction"])


def make_batch(cfg, batch, seq_len, padded, pad_fraction, seed=0):
    """A training batch as the data loader yields it (CPU tensors) and its useful-token count.
    Packed: every position a real token, labels = input_ids. Padded: row b holds lengths[b] tokens, then pad id 0
    with label -100; attention_mask all ones (MiniMind2 passes none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (batch, seq_len), generator=g)
    labels = ids.clone()
    useful = batch * seq_len
    if padded:
        lengths = row_lengths(batch, seq_len, pad_fraction, g)
        pad = torch.arange(seq_len)[None, :] >= lengths[:, None]
        ids[pad] = cfg.pad_token_id
        labels[pad] = -100
        useful = int(lengths.sum())
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}, useful


class TrainStep:
    """One optimizer step, as engine._train's loop does it (see the module docstring)."""

    def __init__(self, cfg, variant, device, lr=5e-4, grad_clip=1.0, weight_decay=0.01):
        from minimind.model import MiniMindForCausalLM
        from train import engine, pretrain
        from train.distributed import Dist
        self.dtype = engine.DTYPES[variant.dtype]
        args = SimpleNamespace(kernels=variant.kernels, attn="sdpa", out_dir=tempfile.gettempdir())
        self.run = engine.Run(args, cfg, None, device, self.dtype, Dist())
        self.model = MiniMindForCausalLM(cfg, kernels=variant.kernels, attn="sdpa").to(device)
        self.model.train()
        self.params = [p for p in self.model.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay,
                                           **({"fused": True} if device.type == "cuda" else {}))
        self.scaler = engine.grad_scaler(device) if self.dtype == torch.float16 else None
        if variant.compile:
            engine.compile_blocks(self.model)  # exactly the engine's --compile
        self.step_module = engine.StageStep(self.model, pretrain.lm_loss, self.run)
        self.grad_clip, self.lr = grad_clip, lr
        self.flops_per_token = engine.default_flops_per_token

    def __call__(self, batch):
        from train import engine
        loss, _, _ = engine.train_step(self.step_module, [batch], self.optimizer, self.params, self.lr,
                                       grad_clip=self.grad_clip, scaler=self.scaler)
        return loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg, variant, device, batch_size, seq_len, pad_fraction, warmup, repeats, peak_flops):
    """Time the step; returns the result fields of one (preset, seq_len, variant) row."""
    if variant.compile:
        # a fresh Dynamo per compiled row: otherwise another preset or length recompiles the blocks' forward with
        # dynamic shapes (automatic dynamic), and past the recompile limit Dynamo silently runs them eagerly
        torch._dynamo.reset()
    step = TrainStep(cfg, variant, device)
    batch, useful = make_batch(cfg, batch_size, seq_len, variant.padded, pad_fraction)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    _sync(device)
    t0 = time.perf_counter()
    loss = step(batch)
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step(batch)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, skipped = [], 0
    for _ in range(repeats):
        scale = step.scaler.get_scale() if step.scaler else None
        _sync(device)
        t0 = time.perf_counter()
        loss = step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
        skipped += bool(step.scaler and step.scaler.get_scale() < scale)  # the scaler backs off on a skipped step
    loss = float(loss)
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"the step's loss is {loss}")
    step_s = statistics.median(times)
    processed = batch_size * seq_len
    flops_per_token = step.flops_per_token(step.model, seq_len)
    row = {"step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
           "first_step_s": first, "tokens_per_step": processed, "useful_tokens_per_step": useful,
           "pad_fraction": 1 - useful / processed, "useful_tokens_per_s": useful / step_s,
           "processed_tokens_per_s": processed / step_s, "flops_per_token": flops_per_token,
           "achieved_TFLOPs": useful * flops_per_token / step_s / 1e12, "loss": loss,
           "parameters": step.model.num_parameters(), "mfu": None, "peak_GiB": None,
           "fp16_skipped_steps": skipped if step.scaler else None}
    if peak_flops:
        row["mfu"] = row["achieved_TFLOPs"] * 1e12 / peak_flops
    if device.type == "cuda":
        row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del step, batch
    return row


def plan(seq_lens, presets, variants):
    """The measurement order, most informative first so that a --budget_s cut loses the least: the eager variants
    of every preset at the first sequence length, the compiled ones (slow to compile) of the first preset, the
    eager ones at the other lengths, then the remaining compiled ones."""
    def block(seqs, ps, compiled):
        return [(s, p, v) for s in seqs for p in ps for v in variants if VARIANTS[v].compile == compiled]
    first, rest = seq_lens[:1], seq_lens[1:]
    return (block(first, presets, False) + block(first, presets[:1], True) + block(rest, presets, False)
            + block(first, presets[1:], True) + block(rest, presets, True))


def add_speedups(rows):
    """useful-token and same-token speedups against the minimind2 row of the same preset and seq_len."""
    refs = {(r["preset"], r["seq_len"]): r for r in rows if r["variant"] == "minimind2" and r["status"] == "ok"}
    for r in rows:
        ref = refs.get((r["preset"], r["seq_len"]))
        if ref and r["status"] == "ok":
            r["speedup"] = r["useful_tokens_per_s"] / ref["useful_tokens_per_s"]
            r["same_token_speedup"] = r["processed_tokens_per_s"] / ref["processed_tokens_per_s"]
    return rows


def _status(r):
    if r["status"] != "ok":
        return f"{r['status']}: {r.get('reason', '')[:80]}"
    if r.get("fp16_skipped_steps"):  # the GradScaler skipped AdamW there: that step did less than MiniMind2's does
        return f"ok, but {r['fp16_skipped_steps']} timed fp16 steps skipped the optimizer (overflow)"
    return "ok"


def markdown(doc):
    lines = ["## Training-step throughput", "", report.env_line(doc["env"]), "",
             f"One optimizer step (forward, backward, clip, AdamW) of the engine; median of {doc['repeats']} steps "
             f"after {doc['warmup']} warm-up. minimind2 rows: pad fraction {doc['pad_fraction']} "
             f"(assumption, see bench/throughput.py). MFU against {report.fmt(doc['peak_TFLOPs'])} TFLOP/s "
             f"(flops/token = 6 N_matmul + 12 L d_attn T).", ""]
    cols = [("preset", "preset"), ("seq", "seq_len"), ("batch", "batch_size"), ("variant", "variant"),
            ("step ms", "step_ms"), ("useful tok/s", "useful_tokens_per_s"), ("speedup", "speedup"),
            ("same-token speedup", "same_token_speedup"), ("MFU", lambda r: None if r.get("mfu") is None
                                                           else f"{100 * r['mfu']:.1f}%"),
            ("peak GiB", "peak_GiB"), ("first step s", "first_step_s"), ("loss", "loss"),
            ("status", _status)]
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows = sorted(doc["results"], key=lambda r: (r["seq_len"], PRESET_ORDER.index(r["preset"]),
                                                 order[r["variant"]]))
    lines.append(report.markdown_table(rows, cols))
    return "\n".join(lines)


def compact(doc):
    """The short form for the suite's summary: one row per preset and length, one column per variant, each cell
    "useful tokens/s, speedup over minimind2, MFU"."""
    lines = ["## Training-step throughput (useful tok/s, speedup vs the minimind2 step, MFU)", "",
             f"minimind2 rows padded at {doc['pad_fraction']} (assumption); MFU against "
             f"{report.fmt(doc['peak_TFLOPs'])} TFLOP/s.", ""]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in doc["results"])]
    cells = {}
    for r in doc["results"]:
        if r["status"] == "ok":
            cell = f"{r['useful_tokens_per_s'] / 1e3:.0f}k {report.fmt(r.get('speedup'))}x"
            if r.get("mfu") is not None:
                cell += f" {100 * r['mfu']:.0f}%"
            if r.get("fp16_skipped_steps"):
                cell += f" ({r['fp16_skipped_steps']} skipped)"
        else:
            cell = r["status"]
        cells.setdefault((r["preset"], r["seq_len"], r["batch_size"]), {})[r["variant"]] = cell
    rows = [{"preset": p, "seq x batch": f"{s} x {b}", **v} for (p, s, b), v in cells.items()]
    lines.append(report.markdown_table(rows, [("preset", "preset"), ("seq x batch", "seq x batch")]
                                       + [(v, v) for v in variants]))
    bad = [r for r in doc["results"] if r["status"] not in ("ok", "unavailable", "skipped")]
    lines += [f"- {r['preset']} {r['seq_len']} {r['variant']}: {r['status']}: {r.get('reason', '')[:150]}"
              for r in bad]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Time one training step of the engine per preset and variant.")
    p.add_argument("--preset", default="all", choices=list(PRESET_ORDER) + ["all"],
                   help="one preset, or all (default)")
    p.add_argument("--seq_len", type=int, nargs="+", default=None, help="default 512 (32 with --cpu-smoke)")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"rows per step (default {DEFAULT_TOKENS_PER_STEP} tokens / seq_len: MiniMind2's 32 x 512)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_ORDER), help=f"any of {list(VARIANTS)}")
    p.add_argument("--pad_fraction", type=float, default=0.5, help="padding share of the minimind2 batches")
    p.add_argument("--pad_fraction_from", default=None, metavar="PRETRAIN.jsonl",
                   help="take the padding share from this pretrain file, one document per row as MiniMind2 "
                        "pads it (counted through minimind.data); overrides --pad_fraction")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (default %(default)s)")
    p.add_argument("--peak_tflops", type=float, default=None, help="override the device peak for MFU")
    p.add_argument("--budget_s", type=float, default=None, help="start no new measurement after this many seconds")
    p.add_argument("--out", default=None, help="folder for throughput.json and throughput.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU in fp32, labelled CPU")
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if args.pad_fraction_from:
        if not os.path.isfile(args.pad_fraction_from):
            p.error(f"--pad_fraction_from {args.pad_fraction_from}: no such file")
        args.pad_fraction = padding_fraction_of(args.pad_fraction_from, (args.seq_len or [512])[0])
        print(f"padding fraction of {args.pad_fraction_from} padded to {(args.seq_len or [512])[0]}: "
              f"{args.pad_fraction:.3f}")
    if not 0 <= args.pad_fraction < 1:
        p.error(f"--pad_fraction must be in [0, 1), got {args.pad_fraction}")
    if args.cpu_smoke and any(VARIANTS[v].kernels == "triton" for v in args.variants):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from train import engine
    if args.cpu_smoke:
        device = torch.device("cpu")
        env = report.environment(label="CPU smoke run (tiny models, fp32; not a benchmark result)")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        env = report.environment()
    else:
        print("bench.throughput: no CUDA GPU here, so nothing is measured (use --cpu-smoke to test the harness).")
        return 0
    peak = engine.peak_flops(device, args.peak_tflops)
    presets = list(PRESET_ORDER) if args.preset == "all" else [args.preset]
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    doc = {"kind": "throughput", "env": env, "warmup": args.warmup, "repeats": args.repeats,
           "pad_fraction": args.pad_fraction, "peak_TFLOPs": peak / 1e12 if peak else None,
           "method": __doc__.split("Variants")[0].strip(), "results": []}
    print(f"bench.throughput on {env['device']} ({env.get('label', 'GPU')}), torch {env['torch']}", flush=True)
    for seq_len, preset, name in plan(args.seq_len or ([32] if args.cpu_smoke else [512]), presets, args.variants):
        cfg = tiny_config(preset) if args.cpu_smoke else MiniMindConfig.from_preset(preset)
        batch_size = args.batch_size or (2 if args.cpu_smoke else max(1, DEFAULT_TOKENS_PER_STEP // seq_len))
        v = VARIANTS[name]
        if name == "minimind2" and PRESETS[preset].get("qk_norm"):  # minimind-3's trainer: bf16, no GradScaler
            v = Variant(v.name, v.kernels, "bf16", v.compile, v.padded)
        if args.cpu_smoke:  # fp32 on the CPU: no fp16 loss scaling there, and it only proves the harness
            v = Variant(v.name, v.kernels, "fp32", v.compile, v.padded)
        row = {"preset": preset, "seq_len": seq_len, "batch_size": batch_size, "variant": name,
               "kernels": v.kernels, "dtype": v.dtype, "compile": v.compile, "padded": v.padded}
        left = deadline - time.monotonic() if deadline else None
        if left is not None and (left <= 0 or (v.compile and left < COMPILE_SECONDS_NEEDED)):
            row.update(status="skipped", reason=f"time budget: {max(left, 0):.0f} s of --budget_s left")
        else:
            try:
                row.update(measure(cfg, v, device, batch_size, seq_len, args.pad_fraction, args.warmup,
                                   args.repeats, peak))
                row["status"] = "ok"
            except torch.cuda.OutOfMemoryError as e:
                row.update(status="oom", reason=str(e)[:300])
            except (RuntimeError, NotImplementedError, ImportError) as e:
                # a backend that cannot run here, or lacks an op (kernels.backend: "the 'liger' backend has no ...")
                unavailable = isinstance(e, ImportError) or "unavailable" in str(e) or "backend has no" in str(e)
                status = "unavailable" if unavailable else "error"
                row.update(status=status, reason=f"{type(e).__name__}: {str(e)[:300]}")
            except Exception as e:
                row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        doc["results"].append(row)
        add_speedups(doc["results"])
        print(f"  {preset:13s} seq {seq_len:5d} x {batch_size:3d} {name:15s} "
              + (f"{row['step_ms']:9.2f} ms  {row['useful_tokens_per_s']:12,.0f} useful tok/s  "
                 f"speedup {report.fmt(row.get('speedup'))}" if row["status"] == "ok"
                 else f"{row['status']}: {row.get('reason', '')[:160]}"), flush=True)
        if args.out:
            report.write_json(os.path.join(args.out, "throughput.json"), doc)
            report.write_text(os.path.join(args.out, "throughput.md"), markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
