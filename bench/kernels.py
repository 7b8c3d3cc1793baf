"""Kernel microbenchmarks: every hot op at MiniMind2 shapes, on every implementation that can run here.

    python -m bench.kernels [--op rms_norm|add_rms_norm|rope|qk_norm_rope|swiglu|linear_cross_entropy|linear_logprobs|
                                  moe|all]
                            [--variants torch torch_compile triton liger torch_F grouped_mm] [--out DIR]
    python -m bench.kernels --cpu-smoke --out DIR     # tiny sizes on the CPU, to prove the harness (labelled CPU)

Without a CUDA GPU (and without --cpu-smoke) it says so and measures nothing.

Shapes (MiniMind2): 16,384 tokens (batch 32 x 512); hidden 512 and 768 (SwiGLU width 1408 / 2048, 8 query and
2 key/value heads of dim 64 / 96); vocab 6400; MoE: hidden 640, expert width 1728, 4 experts, top-2.
qk_norm_rope at minimind-3's shape: 8 query and 4 key/value heads of dim 96 (liger: its rms_norm then its rope).
Precision as the engine trains: activations bf16, parameters fp32, every call inside bf16 autocast.

Variants: torch = kernels/reference.py (for moe that is MiniMind2's per-expert loop), torch_compile =
torch.compile of it, triton = kernels/<op>.py, liger = the liger backend (when installed), torch_F = PyTorch's own
F.linear_cross_entropy (chunked when torch.nn.LinearCrossEntropyOptions exists), grouped_mm = a MoE on PyTorch's
grouped GEMM (F.grouped_mm or torch._grouped_mm) written below.

Timing: triton.testing.do_bench (CUDA events, L2 flushed before each run, warm-up first), median of the repeats.
The first call (compilation, autotuning) is timed separately as first_call_s. "fwd" is the training forward
(graph recorded); "fwd+bwd" adds the backward from fixed random output gradients. A fused kernel may do backward
work in its forward (the linear cross-entropy computes its gradients there), so fwd+bwd is the comparable column.

Counting, written down once:
- bytes (memory-bound ops): each input read once and each output written once at its dtype, the least any
  implementation must move. fwd+bwd = fwd + bwd, where bwd reads the output gradients, the saved inputs and the
  weight and writes the input gradients (per-row statistics like rstd are not counted; for add_rms_norm the two
  input gradients are one tensor, counted once). GB/s = bytes / time; "% copy" = GB/s over the measured
  device-to-device copy bandwidth (bytes read + written).
- FLOPs (matmul ops): linear cross-entropy and log-probs: 2*N*H*V forward (the logits), 6*N*H*V forward+backward
  (+2NHV for dhidden, +2NHV for dweight; a recomputed logits matmul is not credited); the softmax is not counted.
  MoE: 3 matmuls of H x I per (token, chosen expert): 6*N*K*H*I forward, 18*N*K*H*I forward+backward.
- peak memory: torch.cuda.max_memory_allocated during the call minus what was allocated before it (inputs).
- rel_err: ||out - ref|| / ||ref|| (max over outputs; grad: over input gradients), ref = the torch reference on
  float32 copies of the inputs. A sanity check of each variant, not the parity test.
"""
import argparse
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import report

OPS = ("rms_norm", "add_rms_norm", "rope", "qk_norm_rope", "swiglu", "linear_cross_entropy", "linear_logprobs",
       "moe")
VARIANTS = ("torch", "torch_compile", "triton", "liger", "torch_F", "grouped_mm")
# which variants apply to which op (moe's loop graph-breaks on data-dependent shapes: no torch_compile for it)
OP_VARIANTS = {op: ("torch", "torch_compile", "triton", "liger") for op in OPS}
OP_VARIANTS["linear_cross_entropy"] += ("torch_F",)
OP_VARIANTS["linear_logprobs"] += ("torch_F",)
OP_VARIANTS["moe"] = ("torch", "grouped_mm", "triton", "liger")
BACKEND_OP = {op: op for op in OPS}
BACKEND_OP["moe"] = "moe_experts"
# a torch_compile variant (Inductor compiles forward and backward, ~5-30 s on a GPU machine) is not started with
# less of --budget_s left, so that the run ends near its budget instead of being killed by the caller's timeout
COMPILE_SECONDS_NEEDED = 25


@dataclass
class Sizes:
    """The shapes one run uses: MiniMind2's on a GPU, tiny ones for the CPU smoke run."""
    batch: int = 32
    seq: int = 512
    hiddens: tuple = (512, 768)
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 6400
    moe_hidden: int = 640
    moe_inter: int = 1728
    experts: int = 4
    top_k: int = 2
    qk_norm_heads: tuple = (8, 4, 96)  # minimind-3's q heads, kv heads, head dim
    copy_bytes: int = 2 << 30       # one 2 GiB buffer copied (4 GiB moved)
    matmul: int = 8192              # bf16 square matmul for the TFLOP/s ceiling

    @property
    def tokens(self):
        return self.batch * self.seq


CPU_SMOKE = Sizes(batch=2, seq=16, hiddens=(64,), heads=4, kv_heads=2, vocab=128, moe_hidden=32, moe_inter=48,
                  experts=4, top_k=2, qk_norm_heads=(4, 2, 16), copy_bytes=8 << 20, matmul=128)


def intermediate(hidden):
    return 64 * math.ceil(int(8 * hidden / 3) / 64)


@dataclass
class Case:
    """One op at one shape. make(device, act_dtype) -> list of call arguments; grad_args: indices of the
    arguments that get gradients. bytes_* / flops_*: the counts in the module docstring (None = not counted)."""
    op: str
    shape: str
    make: Callable
    grad_args: tuple
    bytes_fwd: Optional[int] = None
    bytes_fwdbwd: Optional[int] = None
    flops_fwd: Optional[int] = None
    flops_fwdbwd: Optional[int] = None
    hidden: Optional[int] = None  # the model width the case belongs to (None: MoE's own)


def _randn(shape, device, dtype, scale=1.0, seed=0):
    """Seeded normal random numbers drawn on the device (fresh, never zeros)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def build_cases(sizes, act_dtype, ops):
    """The cases for the requested ops. act_dtype: activations (bf16 on a GPU); parameters are fp32."""
    s, w = torch.finfo(act_dtype).bits // 8, 4
    B, T, N = sizes.batch, sizes.seq, sizes.tokens
    cases = []
    for H in sizes.hiddens:
        I, D = intermediate(H), H // sizes.heads
        tag = f"N={N},H={H}"
        if "rms_norm" in ops:
            cases.append(Case("rms_norm", tag, lambda dev, dt, H=H: [
                _randn((B, T, H), dev, dt, seed=1), 1 + _randn((H,), dev, torch.float32, 0.1, seed=2)], (0, 1),
                bytes_fwd=2 * N * H * s + H * w, bytes_fwdbwd=(2 * N * H * s + H * w) + (3 * N * H * s + 2 * H * w),
                hidden=H))
        if "add_rms_norm" in ops:
            cases.append(Case("add_rms_norm", tag, lambda dev, dt, H=H: [
                _randn((B, T, H), dev, dt, seed=3), _randn((B, T, H), dev, dt, seed=4),
                1 + _randn((H,), dev, torch.float32, 0.1, seed=5)], (0, 1, 2),
                bytes_fwd=4 * N * H * s + H * w, bytes_fwdbwd=(4 * N * H * s + H * w) + (4 * N * H * s + 2 * H * w),
                hidden=H))
        if "rope" in ops:
            def make_rope(dev, dt, D=D):
                from minimind.model import rope_tables
                cos, sin = rope_tables(D, T)
                return [_randn((B, T, sizes.heads, D), dev, dt, seed=6), _randn((B, T, sizes.kv_heads, D), dev, dt,
                                                                                seed=7), cos.to(dev), sin.to(dev)]
            qk = N * (sizes.heads + sizes.kv_heads) * D
            one_way = 2 * qk * s + 2 * T * D * 4
            cases.append(Case("rope", f"{tag},D={D}", make_rope, (0, 1), bytes_fwd=one_way, bytes_fwdbwd=2 * one_way,
                              hidden=H))
        if "swiglu" in ops:
            cases.append(Case("swiglu", f"N={N},I={I}", lambda dev, dt, I=I: [
                _randn((B, T, I), dev, dt, seed=8), _randn((B, T, I), dev, dt, seed=9)], (0, 1),
                bytes_fwd=3 * N * I * s, bytes_fwdbwd=8 * N * I * s, hidden=H))
        for op in ("linear_cross_entropy", "linear_logprobs"):
            if op in ops:
                V = sizes.vocab

                def make_ce(dev, dt, H=H, V=V):
                    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(10))
                    labels[torch.rand(N, generator=torch.Generator().manual_seed(11)) < 0.1] = -100
                    return [_randn((N, H), dev, dt, seed=12), _randn((V, H), dev, torch.float32, 0.02, seed=13),
                            labels.to(dev)]
                cases.append(Case(op, f"{tag},V={V}", make_ce, (0, 1), flops_fwd=2 * N * H * V,
                                  flops_fwdbwd=6 * N * H * V, hidden=H))
    if "qk_norm_rope" in ops:
        Hq, Hkv, D = sizes.qk_norm_heads

        def make_qk_norm_rope(dev, dt):
            from minimind.model import rope_tables
            cos, sin = rope_tables(D, T)
            return [_randn((B, T, Hq, D), dev, dt, seed=19), _randn((B, T, Hkv, D), dev, dt, seed=20),
                    1 + _randn((D,), dev, torch.float32, 0.1, seed=21), 1 + _randn((D,), dev, torch.float32, 0.1,
                                                                                   seed=22), cos.to(dev), sin.to(dev)]
        qk = N * (Hq + Hkv) * D
        one_way = 2 * qk * s + 2 * T * D * w + 2 * D * w  # q, k in and out; the tables; the two norm weights
        cases.append(Case("qk_norm_rope", f"N={N},Hq={Hq},Hkv={Hkv},D={D}", make_qk_norm_rope, (0, 1, 2, 3),
                          bytes_fwd=one_way, bytes_fwdbwd=one_way + (3 * qk * s + 2 * T * D * w + 4 * D * w)))
    if "moe" in ops:
        H, I, E, K = sizes.moe_hidden, sizes.moe_inter, sizes.experts, sizes.top_k

        def make_moe(dev, dt):
            scores = _randn((N, E), dev, torch.float32, seed=14).softmax(-1)
            topk_weight, topk_idx = scores.topk(K, dim=-1)
            topk_weight = topk_weight / topk_weight.sum(-1, keepdim=True)
            return [_randn((N, H), dev, dt, seed=15), topk_idx, topk_weight,
                    _randn((E, I, H), dev, torch.float32, 0.02, seed=16),
                    _randn((E, I, H), dev, torch.float32, 0.02, seed=17),
                    _randn((E, H, I), dev, torch.float32, 0.02, seed=18)]
        cases.append(Case("moe", f"N={N},H={H},I={I},E={E},K={K}", make_moe, (0, 2, 3, 4, 5),
                          flops_fwd=6 * N * K * H * I, flops_fwdbwd=18 * N * K * H * I))
    # most informative first, so that a --budget_s cut loses the least: every op at the first hidden size
    # (linear cross-entropy and MoE leading), then the other hidden sizes
    priority = ("linear_cross_entropy", "moe", "rms_norm", "add_rms_norm", "swiglu", "rope", "qk_norm_rope",
                "linear_logprobs")
    return sorted(cases, key=lambda c: (c.hidden not in (None, sizes.hiddens[0]), priority.index(c.op)))


def grouped_mm_available():
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def moe_grouped_mm(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """The MoE experts on PyTorch's grouped GEMM (a baseline; same contract as reference.moe_experts).

    The N*K (token, choice) rows are sorted by expert; offs[e] = end row of expert e; one grouped matmul per
    projection: gate, up (rows x H) @ (E, H, I) and down (rows x I) @ (E, I, H); rows go back in (token, choice)
    order and are summed with the routing weights in float32.
    """
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    N, K = topk_idx.shape
    E = w_gate.shape[0]
    sorted_ids, order = topk_idx.reshape(-1).sort(stable=True)
    # offs[e] = rows with expert id <= e; searchsorted keeps it on the device (bincount reads the max back: a sync)
    offs = torch.searchsorted(sorted_ids, torch.arange(1, E + 1, device=sorted_ids.device,
                                                       dtype=sorted_ids.dtype)).to(torch.int32)
    dt = x.dtype
    xs = x[order // K]
    gate = grouped_mm(xs, w_gate.to(dt).transpose(-2, -1), offs=offs)
    up = grouped_mm(xs, w_up.to(dt).transpose(-2, -1), offs=offs)
    h = (F.silu(gate.float()) * up.float()).to(dt)
    y = grouped_mm(h, w_down.to(dt).transpose(-2, -1), offs=offs)
    y = y[order.argsort()].view(N, K, -1).float()
    return (y * topk_weight.float().unsqueeze(-1)).sum(dim=1).to(dt)


def _torch_linear_ce(reduction):
    """PyTorch's F.linear_cross_entropy (chunked when the installed torch has LinearCrossEntropyOptions)."""
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None

    def fn(hidden, weight, labels, ignore_index=-100):
        kw = {"options": options} if options is not None else {}
        out = F.linear_cross_entropy(hidden, weight.to(hidden.dtype), labels, reduction=reduction,
                                     ignore_index=ignore_index, **kw)
        return out.float() if reduction == "mean" else -out.float()
    return fn


class Unavailable(Exception):
    pass


def variant_fn(op, variant):
    """The callable for (op, variant), or Unavailable saying why it cannot run here."""
    from kernels import backend, reference
    name = BACKEND_OP[op]
    if variant == "torch":
        return getattr(reference, name)
    if variant == "torch_compile":
        return torch.compile(getattr(reference, name), dynamic=False)
    if variant in ("triton", "liger"):
        try:
            return getattr(backend.get_backend(variant), name)
        except (RuntimeError, ImportError) as e:
            raise Unavailable(str(e)) from None
    if variant == "torch_F":
        if not hasattr(F, "linear_cross_entropy"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy")
        return _torch_linear_ce("mean" if op == "linear_cross_entropy" else "none")
    if variant == "grouped_mm":
        if not grouped_mm_available():
            raise Unavailable(f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm")
        return moe_grouped_mm
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device, grad_to_none=(), warmup_ms=25, rep_ms=100, cpu_repeats=2):
    """Median time of fn() in milliseconds: do_bench (CUDA events, L2 flushed) on a GPU; on a CPU (smoke runs
    only) the host clock over a warm-up call and cpu_repeats calls."""
    if device.type == "cuda":
        from triton.testing import do_bench
        try:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                  return_mode="median"))
        except TypeError:  # an older triton without return_mode
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                  quantiles=[0.5]))
    times = []
    for _ in range(cpu_repeats + 1):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def peak_mib(fn, device):
    """Peak memory (MiB) fn allocates beyond what was allocated before it; None (and fn not run) on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _rel_err(outs, refs):
    """max over tensors of ||o - r|| / ||r||; inf for a missing (None), misshaped or non-finite tensor."""
    errs = []
    for o, r in zip(outs, refs):
        if o is None or r is None:
            return float("inf")
        o, r = o.detach().double(), r.detach().double()
        if o.shape != r.shape:
            return float("inf")
        errs.append(float((o - r).norm() / r.norm().clamp_min(1e-30)) if torch.isfinite(o).all() else float("inf"))
    return max(errs) if errs else None


class Bench:
    """Runs cases x variants, keeps the results, and rewrites the JSON after every measurement (a run killed by a
    timeout still leaves what it measured)."""

    def __init__(self, device, act_dtype, out_dir, env, budget_s=None, warmup_ms=25, rep_ms=100):
        self.device, self.act_dtype, self.out_dir, self.env = device, act_dtype, out_dir, env
        self.deadline = time.monotonic() + budget_s if budget_s else None
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.ceilings, self.results = {}, []

    def autocast(self):
        if self.act_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.act_dtype)

    def measure_ceilings(self, sizes):
        """Copy bandwidth (bytes read + written) and dense bf16 matmul TFLOP/s, measured here."""
        dev = self.device
        n = sizes.copy_bytes // 4
        src = torch.rand(n, device=dev)
        dst = torch.empty_like(src)
        copy_ms = median_ms(lambda: dst.copy_(src), dev, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        del src, dst
        M = sizes.matmul
        mm_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        a, b = torch.randn(M, M, device=dev, dtype=mm_dtype), torch.randn(M, M, device=dev, dtype=mm_dtype)
        mm_ms = median_ms(lambda: a @ b, dev, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        del a, b
        self.ceilings = {"copy_bytes_moved": 2 * n * 4, "copy_ms": copy_ms,
                         "copy_GBps": 2 * n * 4 / copy_ms / 1e6,
                         "matmul_shape": [M, M, M], "matmul_dtype": str(mm_dtype).replace("torch.", ""),
                         "matmul_ms": mm_ms, "matmul_TFLOPs": 2 * M ** 3 / mm_ms / 1e9}
        self.save()

    def reference(self, case):
        """Outputs and input gradients of the torch reference on float32 copies of the inputs."""
        from kernels import reference
        args = [a.detach().float().requires_grad_(i in case.grad_args) if a.is_floating_point() else a
                for i, a in enumerate(case.make(self.device, self.act_dtype))]
        outs = _tensors(getattr(reference, BACKEND_OP[case.op])(*args))
        grads_out = [_randn(o.shape, self.device, torch.float32, seed=100 + i) for i, o in enumerate(outs)]
        torch.autograd.backward(outs, grads_out)
        ref = ([o.detach() for o in outs], [args[i].grad for i in case.grad_args], grads_out)
        return ref

    def run_case(self, case, variants):
        if self.deadline and time.monotonic() > self.deadline:
            for variant in variants:
                self.results.append({"op": case.op, "shape": case.shape, "variant": variant, "status": "skipped",
                                     "reason": "time budget (--budget_s) spent"})
            self.save()
            return
        try:
            ref_outs, ref_grads, grads_out = self.reference(case)
        except Exception as e:  # without a reference the variants still get timed, without rel_err
            ref_outs = ref_grads = None
            grads_out = None
            print(f"  reference failed for {case.op} {case.shape}: {type(e).__name__}: {e}", flush=True)
        for variant in variants:
            row = {"op": case.op, "shape": case.shape, "variant": variant,
                   "dtype": str(self.act_dtype).replace("torch.", ""),
                   "bytes_fwd": case.bytes_fwd, "bytes_fwdbwd": case.bytes_fwdbwd,
                   "flops_fwd": case.flops_fwd, "flops_fwdbwd": case.flops_fwdbwd}
            left = self.deadline - time.monotonic() if self.deadline else None
            if left is not None and (left <= 0 or (variant == "torch_compile" and left < COMPILE_SECONDS_NEEDED)):
                row.update(status="skipped", reason=f"time budget: {max(left, 0):.0f} s of --budget_s left")
            else:
                try:
                    row.update(self.measure(case, variant, ref_outs, ref_grads, grads_out))
                    row["status"] = "ok"
                except Unavailable as e:
                    row.update(status="unavailable", reason=str(e)[:300])
                except NotImplementedError as e:
                    row.update(status="unavailable", reason=str(e)[:300])
                except torch.cuda.OutOfMemoryError as e:
                    row.update(status="oom", reason=str(e)[:300])
                except Exception as e:
                    row.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
            self.results.append(row)
            print(f"  {case.op:22s} {case.shape:28s} {variant:14s} {_short(row)}", flush=True)
            self.save()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # raises after a sticky CUDA error: the row saying why is saved first

    def measure(self, case, variant, ref_outs, ref_grads, grads_out):
        dev = self.device
        fn = variant_fn(case.op, variant)
        args = [a.requires_grad_(i in case.grad_args) if a.is_floating_point() else a
                for i, a in enumerate(case.make(dev, self.act_dtype))]
        leaves = [args[i] for i in case.grad_args]
        if grads_out is None:
            with self.autocast():
                grads_out = [torch.randn_like(o, dtype=torch.float32) for o in _tensors(fn(*args))]
        grads_cast = None

        def fwd():
            with self.autocast():
                return fn(*args)

        def fwdbwd():
            nonlocal grads_cast
            outs = _tensors(fwd())
            if grads_cast is None:
                grads_cast = [g.to(o.dtype) for g, o in zip(grads_out, outs)]
            torch.autograd.backward(outs, grads_cast)

        t0 = time.perf_counter()
        outs = _tensors(fwd())
        _sync(dev)
        first_fwd = time.perf_counter() - t0
        row = {}
        if ref_outs is not None:
            row["rel_err_out"] = _rel_err(outs, ref_outs)
        del outs
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        fwdbwd()
        _sync(dev)
        row["first_call_s"] = first_fwd + time.perf_counter() - t0
        if ref_grads is not None:
            row["rel_err_grad"] = _rel_err([t.grad for t in leaves], ref_grads)
        for t in leaves:
            t.grad = None
        row["fwd_ms"] = median_ms(fwd, dev, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        row["fwdbwd_ms"] = median_ms(fwdbwd, dev, grad_to_none=leaves, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)
        for t in leaves:
            t.grad = None
        row["fwd_peak_MiB"] = peak_mib(lambda: _tensors(fwd()), dev)
        for t in leaves:
            t.grad = None
        row["fwdbwd_peak_MiB"] = peak_mib(fwdbwd, dev)
        for mode in ("fwd", "fwdbwd"):
            ms = row[f"{mode}_ms"]
            nbytes, flops = getattr(case, f"bytes_{mode}"), getattr(case, f"flops_{mode}")
            if nbytes:
                row[f"{mode}_GBps"] = nbytes / ms / 1e6
                if self.ceilings.get("copy_GBps"):
                    row[f"{mode}_pct_copy"] = 100 * row[f"{mode}_GBps"] / self.ceilings["copy_GBps"]
            if flops:
                row[f"{mode}_TFLOPs"] = flops / ms / 1e9
                if self.ceilings.get("matmul_TFLOPs"):
                    row[f"{mode}_pct_matmul"] = 100 * row[f"{mode}_TFLOPs"] / self.ceilings["matmul_TFLOPs"]
        return row

    def document(self):
        return {"kind": "kernels", "env": self.env, "counting": __doc__.split("Counting, written down once:")[1],
                "ceilings": self.ceilings, "results": self.results}

    def save(self):
        if self.out_dir:
            report.write_json(os.path.join(self.out_dir, "kernels.json"), self.document())
            report.write_text(os.path.join(self.out_dir, "kernels.md"), markdown(self.document()))


def _short(row):
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('reason', '')[:120]}"
    return (f"fwd {row['fwd_ms']:.3f} ms  fwd+bwd {row['fwdbwd_ms']:.3f} ms  "
            f"peak {report.fmt(row.get('fwdbwd_peak_MiB'))} MiB  err {report.fmt(row.get('rel_err_out'), 2)}")


def _rate(mode):
    def cell(r):
        if r.get(f"{mode}_GBps") is not None:
            pct = r.get(f"{mode}_pct_copy")
            return f"{r[f'{mode}_GBps']:.0f} GB/s" + (f" ({pct:.0f}%)" if pct is not None else "")
        if r.get(f"{mode}_TFLOPs") is not None:
            return f"{r[f'{mode}_TFLOPs']:.1f} TFLOP/s"
        return None
    return cell


def _speedup(rows):
    """Per (op, shape): triton's fwd+bwd speed against torch and its fastest rival, checked against the targets of
    issues 3 and 4: at least as fast as the fastest of torch.compile / liger (/ F.linear_cross_entropy / grouped
    GEMM); memory-bound ops at >= 80% of the copy bandwidth; fused linear cross-entropy peak memory <= 1/4 of
    torch eager's; MoE >= 2x the MiniMind2 loop with lower peak memory."""
    by_case = {}
    for r in rows:
        if r.get("status") == "ok":
            by_case.setdefault((r["op"], r["shape"]), {})[r["variant"]] = r
    lines = []
    for (op, shape), v in by_case.items():
        if "triton" not in v:
            continue
        tri = v["triton"]
        rivals = {name: r for name, r in v.items() if name not in ("triton", "torch")}
        parts, misses = [], []
        if "torch" in v:
            x = v["torch"]["fwdbwd_ms"] / tri["fwdbwd_ms"]
            parts.append(f"{x:.2f}x vs torch")
            if op == "moe" and x < 2:
                misses.append("< 2x the loop")
            peak_t, peak_x = v["torch"].get("fwdbwd_peak_MiB"), tri.get("fwdbwd_peak_MiB")
            if peak_t and peak_x is not None:
                parts.append(f"peak {peak_x / peak_t:.2f} of torch's")
                if op in ("linear_cross_entropy", "linear_logprobs") and peak_x > peak_t / 4:
                    misses.append("peak > 1/4 of torch's")
                if op == "moe" and peak_x >= peak_t:
                    misses.append("peak not below the loop's")
        if rivals:
            name, best = min(rivals.items(), key=lambda kv: kv[1]["fwdbwd_ms"])
            x = best["fwdbwd_ms"] / tri["fwdbwd_ms"]
            parts.append(f"{x:.2f}x vs {name} (fastest rival)")
            if x < 1:
                misses.append(f"slower than {name}")
        if tri.get("fwdbwd_pct_copy") is not None:
            parts.append(f"{tri['fwdbwd_pct_copy']:.0f}% of copy bandwidth")
            if tri["fwdbwd_pct_copy"] < 80:
                misses.append("< 80% of copy bandwidth")
        verdict = "targets met" if not misses else "MISSES: " + ", ".join(misses)
        lines.append(f"- {op} [{shape}]: triton fwd+bwd {', '.join(parts)} -> {verdict}")
    return lines


def markdown(doc):
    env, c = doc["env"], doc.get("ceilings") or {}
    lines = ["## Kernel microbenchmarks", "", report.env_line(env), ""]
    if c:
        lines.append(f"Ceilings measured here: copy {c['copy_GBps']:.0f} GB/s (read + write, "
                     f"{c['copy_bytes_moved'] / 2 ** 30:.1f} GiB moved), {c['matmul_dtype']} matmul "
                     f"{c['matmul_shape'][0]}^3 {c['matmul_TFLOPs']:.1f} TFLOP/s.")
        lines.append("")
    cols = [("op", "op"), ("shape", "shape"), ("variant", "variant"), ("fwd ms", "fwd_ms"),
            ("fwd+bwd ms", "fwdbwd_ms"), ("fwd rate (% copy)", _rate("fwd")), ("fwd+bwd rate", _rate("fwdbwd")),
            ("fwd+bwd peak MiB", "fwdbwd_peak_MiB"), ("rel err out", "rel_err_out"),
            ("rel err grad", "rel_err_grad"), ("first call s", "first_call_s"),
            ("status", lambda r: r.get("status") if r.get("status") == "ok"
             else f"{r.get('status')}: {r.get('reason', '')[:80]}")]
    lines.append(report.markdown_table(doc["results"], cols))
    speed = _speedup(doc["results"])
    if speed:
        lines += ["", "Triton against the targets (fwd+bwd time ratios; >1 = triton faster):"] + speed
    return "\n".join(lines)


def compact(doc):
    """The short form for the suite's summary: one row per op and shape, one column per variant, each cell
    "fwd ms / fwd+bwd ms" plus the fwd+bwd rate (% of copy bandwidth, or TFLOP/s)."""
    c = doc.get("ceilings") or {}
    lines = ["## Kernel microbenchmarks (fwd / fwd+bwd ms, fwd+bwd % of copy bandwidth or TFLOP/s)", ""]
    if c:
        lines += [f"Ceilings here: copy {c['copy_GBps']:.0f} GB/s, {c['matmul_dtype']} matmul "
                  f"{c['matmul_TFLOPs']:.0f} TFLOP/s.", ""]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in doc["results"])]
    cells = {}
    for r in doc["results"]:
        if r.get("status") == "ok":
            rate = (f" {r['fwdbwd_pct_copy']:.0f}%" if r.get("fwdbwd_pct_copy") is not None else
                    f" {r['fwdbwd_TFLOPs']:.0f}T" if r.get("fwdbwd_TFLOPs") is not None else "")
            cell = f"{r['fwd_ms']:.3g}/{r['fwdbwd_ms']:.3g}{rate}"
            if r.get("fwdbwd_peak_MiB") is not None and (r.get("flops_fwd") or r["op"] == "moe"):
                cell += f" {r['fwdbwd_peak_MiB']:.0f}MiB"
        else:
            cell = r.get("status")
        cells.setdefault((r["op"], r["shape"]), {})[r["variant"]] = cell
    rows = [{"op": op, "shape": shape, **v} for (op, shape), v in cells.items()]
    lines.append(report.markdown_table(rows, [("op", "op"), ("shape", "shape")] + [(v, v) for v in variants]))
    speed = _speedup(doc["results"])
    if speed:
        lines += [""] + speed
    bad = [r for r in doc["results"] if r.get("status") not in ("ok", "unavailable")]
    lines += [f"- {r['op']} [{r['shape']}] {r['variant']}: {r['status']}: {r.get('reason', '')[:150]}" for r in bad]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Kernel microbenchmarks at MiniMind2 shapes (GPU; --cpu-smoke for a "
                                            "tiny CPU run of the harness).")
    p.add_argument("--op", default="all", choices=OPS + ("all",), help="one op, or all (default)")
    p.add_argument("--variants", nargs="*", default=None, help=f"subset of {VARIANTS} (default: all that apply)")
    p.add_argument("--out", default=None, help="folder for kernels.json and kernels.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (fp32), labelled CPU")
    p.add_argument("--budget_s", type=float, default=None,
                   help="start no new measurement after this many seconds (no torch_compile one with less than "
                        f"{COMPILE_SECONDS_NEEDED} s of it left)")
    p.add_argument("--warmup_ms", type=float, default=25, help="warm-up time per measurement (default %(default)s)")
    p.add_argument("--rep_ms", type=float, default=100, help="timed time per measurement (default %(default)s)")
    args = p.parse_args(argv)
    if args.variants:
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    if args.cpu_smoke:
        if "triton" in (args.variants or VARIANTS):  # before report.environment() imports triton
            os.environ.setdefault("TRITON_INTERPRET", "1")
        device, act_dtype, sizes = torch.device("cpu"), torch.float32, CPU_SMOKE
        env = report.environment(label="CPU smoke run (tiny sizes; not a benchmark result)")
    elif torch.cuda.is_available():
        device, act_dtype, sizes = torch.device("cuda"), torch.bfloat16, Sizes()
        env = report.environment()
    else:
        print("bench.kernels: no CUDA GPU here, so nothing is measured (use --cpu-smoke to test the harness).")
        return 0
    ops = OPS if args.op == "all" else (args.op,)
    bench = Bench(device, act_dtype, args.out, env, args.budget_s, args.warmup_ms, args.rep_ms)
    print(f"bench.kernels on {env['device']} ({env.get('label', 'GPU')}), torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)
    bench.measure_ceilings(sizes)
    c = bench.ceilings
    print(f"  ceilings: copy {c['copy_GBps']:.0f} GB/s, matmul {c['matmul_TFLOPs']:.1f} TFLOP/s", flush=True)
    for case in build_cases(sizes, act_dtype, ops):
        variants = [v for v in OP_VARIANTS[case.op] if not args.variants or v in args.variants]
        bench.run_case(case, variants)
    print(markdown(bench.document()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
