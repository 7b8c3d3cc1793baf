"""The modelled training step: launches, bytes and FLOPs of one step, counted on a CPU and projected onto GPUs.

    python -m bench.model [--preset small base moe] [--variants minimind2 torch triton liger]
                          [--gpus "RTX 3090" "H100 SXM" ...] [--results bench/results] [--out bench/results/model]

For each preset at MiniMind's batch (32 x 512 tokens) and each variant of bench.throughput (one engine step,
configured differently: minimind2 is MiniMind2's configuration, fp16 + GradScaler, torch kernels, one document per
row padded to 512 with the assumed pad fraction 0.5; torch, triton and liger are bf16 and packed), bench/launches.py
counts one training step (forward, loss, backward, clip, AdamW) on fake tensors, and bench/roofline.py projects
it onto each GPU. Everything here is MODELLED, NOT MEASURED. torch.compile variants are not modelled (Inductor
decides their kernels). liger is counted where liger-kernel is installed (its ops need a GPU to run, not to be
counted); its Triton kernels have no traffic formula here, so their bytes are estimates (each tensor argument once).

Writes model.json and model.md under --out (default bench/results/model/). Where --results holds a run measured on a
modelled GPU (bench/gpu_suite.sh), that GPU's constants are calibrated from it and modelled and measured step
times are shown side by side.
"""
import argparse
import dataclasses
import os
import sys
import time

from bench import report

DEFAULT_VARIANTS = ("minimind2", "torch", "triton", "liger")
BATCH, SEQ = 32, 512
LAUNCH_HEAVY = 0.2  # a launch share above this is called out in the findings


def _enable_counting_backends(variants):
    """Make the backends constructible here: Triton under the interpreter flag (no kernel runs: launches are
    intercepted), liger without its GPU check. Returns {variant: why it cannot be counted}."""
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from bench.throughput import VARIANTS
    from kernels import backend
    skipped = {}
    for v in variants:
        if v not in VARIANTS or VARIANTS[v].compile:
            skipped[v] = "not a modelled variant (torch.compile variants are decided by Inductor)"
        elif VARIANTS[v].kernels == "liger":
            try:
                import liger_kernel  # noqa: F401
                from unittest import mock
                with mock.patch.object(backend, "liger_unavailable_reason", lambda: None):
                    backend.get_backend("liger")
            except ImportError as e:
                skipped[v] = f"liger-kernel is not installed ({e})"
        elif VARIANTS[v].kernels == "triton":
            why = backend.triton_unavailable_reason()
            if why:
                skipped[v] = why
            else:
                backend.get_backend("triton")
    return skipped


def count_all(presets, variants, gpus, skipped):
    """{(preset, variant, sms): StepCount}: Triton variants once per SM count (rms_norm's backward grid), the
    others once (sms None). A preset a backend cannot run goes into `skipped` with the reason."""
    from bench import launches
    from bench.throughput import VARIANTS
    counts = {}
    for preset in presets:
        for v in variants:
            if v in skipped:
                continue
            sms_list = sorted({g.sms for g in gpus}) if VARIANTS[v].kernels == "triton" else [None]
            for sms in sms_list:
                t0 = time.perf_counter()
                try:
                    counts[(preset, v, sms)] = launches.count_step(preset, v, sms=sms or gpus[0].sms,
                                                                   batch_size=BATCH, seq_len=SEQ)
                except NotImplementedError as e:  # a backend without one of the preset's ops (liger: MoE)
                    skipped[f"{preset} {v}"] = str(e)
                    break
                print(f"  counted {preset:5s} {v:9s}{'' if sms is None else f' ({sms} SMs)':10s} "
                      f"{counts[(preset, v, sms)].totals()['launches']:5d} launches "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return counts


def fused_ops(presets, sms):
    """Each memory-bound fused op of the triton backend (bench.launches.GUARDED_OPS) at one layer's call of each
    preset, forward + backward, under bf16 autocast: the bytes it moves against the least it must move."""
    from bench import launches
    from minimind.config import MiniMindConfig
    rows = []
    for preset in presets:
        cfg = MiniMindConfig.from_preset(preset)
        shapes = launches.Shapes(cfg.hidden_size, tokens=BATCH * SEQ, seq=SEQ, heads=cfg.num_attention_heads,
                                 kv_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
                                 head_size=cfg.head_dim)
        unused = "rope" if cfg.qk_norm else "qk_norm_rope"  # minimind-3 rotates through the fused q/k norm
        for op in (op for op in launches.GUARDED_OPS if op != unused):
            c = launches.count_guarded_op(op, shapes, sms)
            rows.append({"preset": preset, "op": op, "hidden": cfg.hidden_size, "bytes": c.bytes(),
                         "minimum_bytes": c.minimum_forward + c.minimum_backward, "ratio": c.ratio,
                         "launches": sum(l.kernels for l in c.launches if l.op == op)})
    return rows


def _step_for(counts, preset, variant, g):
    return counts.get((preset, variant, g.sms)) or counts.get((preset, variant, None))


def build(presets, variants, gpu_names, results_dir):
    """The model document (see the module docstring)."""
    from bench import roofline
    gpus = [roofline.gpu(name) for name in gpu_names]
    skipped = _enable_counting_backends(variants)
    counts = count_all(presets, variants, gpus, skipped)
    doc = {"kind": "model", "label": roofline.LABEL,
           "env": report.environment(label=f"CPU count ({roofline.LABEL})"),
           "batch_size": BATCH, "seq_len": SEQ, "method": __doc__.split("Writes")[0].strip(),
           "skipped": skipped, "steps": [], "projections": [], "calibration": {}}
    for (preset, variant, sms), step in counts.items():
        if sms is not None and sms != gpus[0].sms:
            continue  # one count per (preset, variant) in the counts table: the first GPU's
        totals = step.totals()
        doc["steps"].append({
            "preset": preset, "variant": variant, "sms": step.sms, "useful_tokens": step.useful_tokens,
            "tokens": step.batch_size * step.seq_len, "flops_per_token": step.flops_per_token, **totals,
            "by_phase": step.by("phase"), "by_op": step.by("op"),
            "triton_kernels": {name: {"launches": t["launches"], "bytes": t["bytes"]}
                               for name, t in step.by("name").items()
                               if any(l.kind == "triton" and l.name == name for l in step.launches)},
            "estimated_traffic_bytes": sum(l.bytes for l in step.launches if l.traffic == "estimate")})
    for g in gpus:
        steps = {(p, v, SEQ, BATCH): s for p in presets for v in variants if (s := _step_for(counts, p, v, g))}
        calibrated, measured = roofline.calibrate(g, steps, results_dir) if results_dir else (g, [])
        doc["calibration"][g.name] = {"constants": dataclasses.asdict(calibrated), "measured_vs_modelled": measured}
        doc["projections"] += [{"preset": p, "variant": v, **roofline.project(s, calibrated)}
                               for (p, v, _, _), s in steps.items()]
    doc["fused_ops"] = fused_ops(presets, gpus[0].sms) if "triton" not in skipped else []
    doc["findings"] = findings(doc)
    return doc


def _projection(doc, preset, variant, gpu):
    return next((r for r in doc["projections"] if (r["preset"], r["variant"], r["gpu"]) == (preset, variant, gpu)),
                None)


def findings(doc):
    """What the model says about launch overhead, in sentences (numbers from the document)."""
    lines = []
    for preset in dict.fromkeys(r["preset"] for r in doc["projections"]):
        for variant in ("triton", "minimind2"):
            rows = [r for r in doc["projections"] if r["preset"] == preset and r["variant"] == variant]
            if not rows:
                continue
            lo, hi = min(rows, key=lambda r: r["share_launch"]), max(rows, key=lambda r: r["share_launch"])
            lines.append(f"{preset} {variant}: {rows[0]['launches']:,} launches, {rows[0]['syncs']} host syncs per "
                         f"step; launch overhead is {100 * lo['share_launch']:.0f}% ({lo['gpu']}) to "
                         f"{100 * hi['share_launch']:.0f}% ({hi['gpu']}) of the modelled step.")
    over = [r for r in doc.get("fused_ops", []) if r["ratio"] > 1.1]
    if over:
        lines.append("Fused ops above 1.1x their minimum traffic: " + ", ".join(
            f"{r['op']} ({r['preset']}) {r['ratio']:.2f}x" for r in over) + " (see tests/test_perf_guard.py).")
    for step in doc.get("steps", []):
        if step["variant"] == "triton" and step["preset"] == "small":
            top = sorted(step["by_op"].items(), key=lambda kv: -kv[1]["launches"])[:3]
            lines.append(f"Most launches of the small triton step: " + ", ".join(
                f"{op} {t['launches']} ({t['bytes'] / 1e9:.1f} GB)" for op, t in top) + ". 'casts and copies' are "
                "autocast's: every float32 weight cast to the autocast dtype in the forward and its gradient cast "
                "back in the backward, and the float32 residual stream's norm outputs cast once per projection "
                "that reads them.")
    heavy = [r for r in doc["projections"] if r["variant"] == "triton" and r["share_launch"] > LAUNCH_HEAVY]
    if heavy:
        worst = max(heavy, key=lambda r: r["share_launch"])
        lines.append(f"Launches dominate where the GPU is fast and the model small: {worst['preset']} on "
                     f"{worst['gpu']} spends {worst['launch_ms']:.1f} of {worst['step_ms']:.1f} ms launching "
                     "kernels. Packed rows have static shapes, so CUDA graphs can replay the compiled blocks' "
                     "kernels without launching them one by one: `--compile --compile_mode reduce-overhead` (untested "
                     "until a GPU runs it).")
    return lines


def _ms(r):
    return f"{r['step_ms']:.1f} ms, {r['useful_tokens_per_s'] / 1e3:.0f}k tok/s, MFU {100 * r['mfu']:.0f}%"


def markdown(doc):
    """The report: counts, projections per GPU, the MiniMind2-Small step on a 3090, findings, calibration."""
    f = report.fmt
    lines = [f"## Modelled training step ({doc['label']})", "", report.env_line(doc["env"]), "",
             f"One training step (forward, loss, backward, clip, AdamW) at {doc['batch_size']} x {doc['seq_len']} "
             "tokens, counted on a CPU on fake tensors (bench/launches.py) and projected onto each GPU "
             "(bench/roofline.py: time per launch = max(bytes / bandwidth, FLOPs / FLOP rate) + launch overhead). "
             "minimind2 = MiniMind2's configuration on the same engine (fp16, torch kernels, padded rows at an "
             "assumed pad fraction of 0.5: its useful tokens are half).", "",
             "### Per step (counted)", ""]
    cols = [("preset", "preset"), ("variant", "variant"), ("launches", "launches"),
            ("of them Triton", "triton_launches"), ("host syncs", "syncs"),
            ("GB moved", lambda r: r["bytes"] / 1e9), ("TFLOP", lambda r: r["flops"] / 1e12),
            ("useful tokens", "useful_tokens")]
    lines.append(report.markdown_table(doc["steps"], cols))
    if doc["skipped"]:
        lines += [""] + [f"- {v}: not counted: {why}" for v, why in doc["skipped"].items()]
    gpus = list(doc["calibration"])
    lines += ["", f"### Projected step per GPU ({doc['label']}): step time, useful tokens/s, MFU", ""]
    cells = {}
    for r in doc["projections"]:
        cells.setdefault((r["preset"], r["variant"]), {})[r["gpu"]] = _ms(r)
    rows = [{"preset": p, "variant": v, **c} for (p, v), c in cells.items()]
    lines.append(report.markdown_table(rows, [("preset", "preset"), ("variant", "variant")] + [(g, g) for g in gpus]))
    lines += ["", f"### Where the time goes ({doc['label']}): launch / memory / compute share of the step", ""]
    cells = {}
    for r in doc["projections"]:
        cells.setdefault((r["preset"], r["variant"]), {})[r["gpu"]] = (
            f"{100 * r['share_launch']:.0f} / {100 * r['share_memory']:.0f} / {100 * r['share_compute']:.0f}%")
    rows = [{"preset": p, "variant": v, **c} for (p, v), c in cells.items()]
    lines.append(report.markdown_table(rows, [("preset", "preset"), ("variant", "variant")] + [(g, g) for g in gpus]))
    lines += ["", headline(doc)]
    ours, ref = _projection(doc, "small", "triton", "RTX 3090"), _projection(doc, "small", "minimind2", "RTX 3090")
    if ours and ref:
        lines += ["", f"### MiniMind2-Small on an RTX 3090, per op ({doc['label']}): modelled ms", ""]
        ops = sorted(set(ours["per_op_ms"]) | set(ref["per_op_ms"]),
                     key=lambda op: -max(ours["per_op_ms"].get(op, 0), ref["per_op_ms"].get(op, 0)))
        steps = {s["variant"]: s for s in doc["steps"] if s["preset"] == "small"}
        rows = []
        for op in ops:
            row = {"op": op}
            for name, proj in (("ours (triton)", ours), ("MiniMind2-style", ref)):
                t = steps[proj["variant"]]["by_op"].get(op, {})
                row[name] = (f"{proj['per_op_ms'].get(op, 0):.2f} ms, {t.get('launches', 0)} launches, "
                             f"{t.get('bytes', 0) / 1e9:.2f} GB")
            rows.append(row)
        lines.append(report.markdown_table(rows, [("op", "op"), ("ours (triton)", "ours (triton)"),
                                                  ("MiniMind2-style", "MiniMind2-style")]))
    if doc["fused_ops"]:
        lines += ["", "### Fused ops against the least traffic they need (triton, one layer's call, forward + backward, "
                      "bf16 autocast; tests/test_perf_guard.py holds them to 1.1x)", ""]
        lines.append(report.markdown_table(doc["fused_ops"], [
            ("preset", "preset"), ("op", "op"), ("launches", "launches"), ("MB moved", lambda r: r["bytes"] / 1e6),
            ("MB minimum", lambda r: r["minimum_bytes"] / 1e6), ("ratio", "ratio")]))
    lines += ["", "### What the model shows", ""] + [f"- {x}" for x in doc["findings"]]
    lines += ["", "### Constants and calibration", ""]
    for g, cal in doc["calibration"].items():
        c = cal["constants"]
        source = (f"calibrated from bench/results/{c['calibrated_from']} (measured copy bandwidth and matmul rate; "
                  "launch overhead fitted to its step times)" if c.get("calibrated_from")
                  else "datasheet, uncalibrated")
        lines.append(f"- {g}: {f(c.get('gbps'))} GB/s, {f(c.get('tflops'))} TFLOP/s, {f(c.get('launch_us'))} us "
                     f"per launch, {f(c.get('sync_us'))} us per sync: {source}.")
        for m in cal["measured_vs_modelled"]:
            lines.append(f"  - {m['preset']} {m['variant']} seq {m['seq_len']} x {m['batch_size']}: measured "
                         f"{m['measured_step_ms']:.1f} ms, modelled {m['modelled_step_ms']:.1f} ms")
    return "\n".join(lines)


def headline(doc):
    """One sentence: the modelled MiniMind2-Small step on an RTX 3090, ours against the MiniMind2-style step."""
    ours, ref = _projection(doc, "small", "triton", "RTX 3090"), _projection(doc, "small", "minimind2", "RTX 3090")
    if not (ours and ref):
        return "(MiniMind2-Small on an RTX 3090: not modelled in this run.)"
    return (f"**MiniMind2-Small on an RTX 3090 ({doc['label']}):** ours (triton) {_ms(ours)} "
            f"({ours['launches']} launches); the MiniMind2-style step {_ms(ref)} ({ref['launches']} launches, "
            f"{ref['syncs']} host syncs): {ours['useful_tokens_per_s'] / ref['useful_tokens_per_s']:.1f}x the "
            "useful tokens per second.")


def main(argv=None):
    from bench import roofline
    from minimind.config import PRESETS
    p = argparse.ArgumentParser(description="Model one training step per preset and variant: launches, bytes, "
                                            "FLOPs (counted on this CPU) and a roofline projection per GPU.")
    p.add_argument("--preset", nargs="+", default=["small", "base", "moe"], choices=sorted(PRESETS))
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--gpus", nargs="+", default=list(roofline.GPUS), choices=list(roofline.GPUS))
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"),
                   help="measured runs to calibrate from ('' for none)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "model"))
    args = p.parse_args(argv)
    from bench.throughput import VARIANTS
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    print(f"bench.model: counting one step per preset and variant on this CPU ({roofline.LABEL})", flush=True)
    doc = build(args.preset, args.variants, args.gpus, args.results)
    text = markdown(doc)
    if args.out:
        report.write_json(os.path.join(args.out, "model.json"), doc)
        report.write_text(os.path.join(args.out, "model.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
