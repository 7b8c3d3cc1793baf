"""A roofline projection of one counted training step (bench/launches.py) onto a GPU, and its calibration.

    t(launch) = max(bytes / bandwidth, exec_flops / flop_rate) + kernels * launch_s + syncs * sync_s
    step time = the sum over the step's launches (nothing overlaps: a lower bound on the rates, an upper bound
                on the overheads); tokens/s = useful tokens / step time;
    MFU       = tokens/s * the engine's flops/token (6 N + 12 L d T) / the datasheet peak

The constants of each GPU: datasheet memory bandwidth and dense bf16 tensor FLOP/s (bench/cost.py's DATASHEET,
the project's one table of them), launch_s = 4 us per kernel (what one eager PyTorch launch costs when kernels
are short: the CPU issuing it, the GPU's gap between kernels) and sync_s = 20 us per host sync (a round trip that
drains the queue). Every figure is MODELLED, NOT MEASURED: a GPU reaches neither its datasheet bandwidth nor its
peak FLOP rate (MiniMind's matmuls are small), so uncalibrated projections are optimistic about compute and
memory, and the launch term is a guess.

Calibration: where bench/results/<run>/ holds a throughput.json (and kernels.json) measured on that GPU by
bench/gpu_suite.sh, `calibrate` replaces the datasheet rates by the measured ones (copy bandwidth and bf16 matmul
rate from kernels.json) and launch_s by the value that makes the model meet the measured step times (least
squares over the measured rows the model also covers, at least 0); the report puts modelled and measured side by
side and names the run it calibrated from.
"""
import glob
import json
import os
from dataclasses import dataclass, replace

from bench.cost import DATASHEET

LABEL = "modelled, not measured"
LAUNCH_US, SYNC_US = 4.0, 20.0
# the modelled GPUs: name -> (bench.cost.DATASHEET key, streaming multiprocessors)
GPUS = {"RTX 3090": ("RTX 3090", 82), "RTX 4090": ("RTX 4090", 128), "A100 SXM 80GB": ("A100", 108),
        "H100 SXM": ("H100", 132), "H200 SXM": ("H200", 132)}


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    tflops: float          # dense bf16 tensor FLOP/s (TFLOP/s): the rate matmuls and attention run at here
    gbps: float            # memory bandwidth (GB/s)
    peak_tflops: float     # the datasheet peak, MFU's denominator
    launch_us: float = LAUNCH_US
    sync_us: float = SYNC_US
    calibrated_from: str = None


def gpu(name):
    """The datasheet GPU `name` (a key of GPUS)."""
    if name not in GPUS:
        raise ValueError(f"bench/roofline.py: unknown GPU {name!r}; choose from {sorted(GPUS)}")
    key, sms = GPUS[name]
    tflops, gbps = DATASHEET[key]
    return GPU(name, sms, tflops, gbps, tflops)


def datasheet_key(device_name):
    """The DATASHEET key a CUDA device name matches (most specific first, as bench.cost does), or None."""
    return next((key for key in DATASHEET if key in (device_name or "")), None)


def launch_time(launch, g):
    """(memory s, compute s, overhead s) of one Launch on GPU g."""
    memory = launch.bytes / (g.gbps * 1e9)
    compute = launch.exec_flops / (g.tflops * 1e12)
    return memory, compute, launch.kernels * g.launch_us * 1e-6 + launch.syncs * g.sync_us * 1e-6


def project(step, g):
    """The modelled step of a StepCount on GPU g: times (ms), shares, tokens/s, MFU, and ms per op."""
    memory = compute = overhead = 0.0
    per_op = {}
    for launch in step.launches:
        m, c, o = launch_time(launch, g)
        memory += m if m >= c else 0.0
        compute += c if c > m else 0.0
        overhead += o
        per_op[launch.op] = per_op.get(launch.op, 0.0) + max(m, c) + o
    total = memory + compute + overhead
    totals = step.totals()
    return {"gpu": g.name, "label": LABEL, "step_ms": total * 1e3, "memory_ms": memory * 1e3,
            "compute_ms": compute * 1e3, "launch_ms": overhead * 1e3,
            "share_launch": overhead / total, "share_memory": memory / total, "share_compute": compute / total,
            "useful_tokens_per_s": step.useful_tokens / total,
            "mfu": step.useful_tokens * step.flops_per_token / total / (g.peak_tflops * 1e12),
            "launches": totals["launches"], "syncs": totals["syncs"],
            "per_op_ms": {k: v * 1e3 for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "constants": {"tflops": g.tflops, "gbps": g.gbps, "launch_us": g.launch_us, "sync_us": g.sync_us,
                          "calibrated_from": g.calibrated_from}}


def measured_runs(results_dir, g):
    """[(run folder, throughput doc, kernels doc or None)] measured on GPU g under results_dir, newest first."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "throughput.json")), reverse=True):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        env = doc.get("env", {})
        if env.get("device_kind") != "cuda" or datasheet_key(env.get("device")) != GPUS[g.name][0]:
            continue
        kernels_path = os.path.join(os.path.dirname(path), "kernels.json")
        kernels = None
        if os.path.isfile(kernels_path):
            with open(kernels_path, encoding="utf-8") as f:
                kernels = json.load(f)
        runs.append((os.path.dirname(path), doc, kernels))
    return runs


def calibrate(g, steps, results_dir):
    """(GPU with calibrated constants, [measured rows matched to a modelled step]) from the newest run measured on
    g under results_dir; (g, []) when there is none. steps: {(preset, variant, seq_len, batch_size): StepCount}."""
    runs = measured_runs(results_dir, g)
    if not runs:
        return g, []
    folder, throughput, kernels = runs[0]
    ceil = (kernels or {}).get("ceilings") or {}
    g = replace(g, gbps=ceil.get("copy_GBps") or g.gbps, tflops=ceil.get("matmul_TFLOPs") or g.tflops,
                calibrated_from=os.path.basename(folder))
    rows = [(r, steps.get((r["preset"], r["variant"], r["seq_len"], r["batch_size"])))
            for r in throughput.get("results", []) if r.get("status") == "ok"]
    rows = [(r, s) for r, s in rows if s is not None]
    if rows:  # launch_s by least squares: measured - (rates' part) = kernels * launch_s
        base, n = [], []
        for r, s in rows:
            p = project(s, replace(g, launch_us=0.0))
            base.append(r["step_ms"] * 1e-3 - p["step_ms"] * 1e-3)
            n.append(s.totals()["launches"])
        fit = sum(b * k for b, k in zip(base, n)) / max(sum(k * k for k in n), 1)
        g = replace(g, launch_us=max(fit, 0.0) * 1e6)
    return g, [{"preset": r["preset"], "variant": r["variant"], "seq_len": r["seq_len"],
                "batch_size": r["batch_size"], "measured_step_ms": r["step_ms"],
                "modelled_step_ms": project(s, g)["step_ms"]} for r, s in rows]
