"""The MiniMind README's cost tables (stage x model -> hours and yuan), from measured throughput: MiniMind2's
(small, base, moe on pretrain_hq, sft_*, dpo) and minimind-3's (minimind3, minimind3-moe on pretrain_t2t_mini,
sft_t2t_mini, the tool-call SFT and RLAIF; the full pretrain_t2t and sft_t2t beside them).

    python -m bench.cost --throughput DIR/throughput.json [--kernels_json DIR/kernels.json]
                         [--tokens pretrain=4.3e8 ...] [--data pretrain=dataset/pretrain_hq.jsonl ...]
                         [--epochs sft_512=2 ...] [--price_per_hour 1.3] [--out DIR]

Tokens per stage (one epoch), best source first:
  --data stage=PATH   counted through the project's own pipeline (minimind.data.build_loader with packing /
                      length bucketing, loader.stats()["tokens"] = useful tokens): "measured".
  --tokens stage=N    given: "given".
  default             ESTIMATE from MiniMind's published file size: tokens = bytes / bytes_per_token, with
                      bytes_per_token measured with the MiniMind tokenizer (vocab 6400) on prose of the stage's
                      language: 3.70 UTF-8 bytes per token for Chinese (1.23 characters per token, Chinese runs of
                      the MiniMind README), 2.6 for English (English project prose), 3.1 for mixed files. JSON keys
                      and chat-template tokens are taken to roughly cancel. Expect +-25%; labelled "estimate".
                      minimind-3's tokenizer is retrained at the same size: the same rates are assumed. The tool-call
                      SFT and RLAIF have no published size: without --tokens / --data their rows show only
                      MiniMind's published hours (RLAIF is RL with rollouts, which bench.throughput does not time).

Hours on this GPU = tokens x epochs x work / (useful tokens/s of one training step, bench.throughput), with
work = 1 for LM stages and 4/3 for DPO (the frozen reference model's forward, about a third of a training step,
runs on the same tokens). The step of the stage's sequence length is used (the nearest measured one if that
length was not measured: labelled). "ours" = the fastest of our variants (not minimind2) in the throughput file.

RTX 3090 projections (labelled projections; 71 TFLOP/s dense bf16, 936 GB/s, 24 GB):
  roofline  split our measured step time t into matmul time t_mm = processed tokens x flops/token / R and the
            rest, R = the bf16 matmul rate measured on this GPU (kernels.json of the same device; else 0.8 x
            the datasheet peak, and the table says so).
            t_3090 = t_mm x (peak_here / 71 TFLOP/s) + (t - t_mm) x (bandwidth_here / 936 GB/s), with the
            datasheet peak and bandwidth of this GPU (an H200 SXM: 989 TFLOP/s, 4800 GB/s): the 3090 is assumed
            to reach the same fractions of its datasheet rates as this GPU does. This treats the whole rest as
            memory traffic: conservative for launch and host overheads (they do not grow on a 3090), but not an
            upper bound, since the rest also holds the matmul time lost below R at MiniMind's small widths, which
            could grow by up to the compute ratio. The optimistic bound t_mm x (peak_here / 71) + (t - t_mm)
            treats the rest as pure overhead. Both are shown.
  ratio     MiniMind's published 3090 hours (for one epoch, as the README's tables; x epochs) / our measured
            speedup over the minimind2 step (useful tokens/s, same preset and sequence length, same run); MiniMind
            timed only pretrain and sft_mini_512, its other hours are its own size-based estimates (minimind-3's
            table is "empirical estimates" throughout). It
            assumes the speedup carries over to a 3090; the part of it that removes launch overhead and host
            syncs (the per-expert loop) is likely smaller on the slower 3090, so this projection leans optimistic.
Target reported against: MiniMind2-Small pretrain + sft_mini_512 under 0.7 h on a 3090 and under 1 yuan. Beside
it, minimind-3's "Zero" model (pretrain_t2t_mini + sft_t2t_mini, one epoch each), published at 2.31 h / 3.0 yuan
(minimind-3) and 3.23 h / 4.2 yuan (minimind-3-MoE).
"""
import argparse
import json
import os
import sys

from bench import report
from minimind.config import PRESETS

BYTES_PER_TOKEN = {"zh": 3.70, "en": 2.6, "mixed": 3.1}
GB = 1e9  # MiniMind's sizes read as decimal gigabytes


# stage -> generation, file, published size (None: not published), data kind, sequence length, language, work per
# token (None: not an LM step), MiniMind's 3090 hours per epoch
M2, M3 = "MiniMind2", "minimind-3"
STAGES = {
    "pretrain": dict(generation=M2, file="pretrain_hq.jsonl", gb=1.6, kind="pretrain", seq=512, lang="zh", work=1.0,
                     published={"small": 1.1, "base": 3.9}),
    "sft_mini_512": dict(generation=M2, file="sft_mini_512.jsonl", gb=1.2, kind="sft", seq=512, lang="zh", work=1.0,
                         published={"small": 1.0, "base": 3.3}),
    "sft_512": dict(generation=M2, file="sft_512.jsonl", gb=7.5, kind="sft", seq=512, lang="zh", work=1.0,
                    published={"small": 6.0, "base": 20.0}),
    "sft_1024": dict(generation=M2, file="sft_1024.jsonl", gb=5.6, kind="sft", seq=1024, lang="mixed", work=1.0,
                     published={"small": 4.58, "base": 15.0}),
    "sft_2048": dict(generation=M2, file="sft_2048.jsonl", gb=9.0, kind="sft", seq=2048, lang="mixed", work=1.0,
                     published={"small": 7.5, "base": 25.0}),
    "rlhf": dict(generation=M2, file="dpo.jsonl", gb=0.9, kind="dpo", seq=1024, lang="en", work=4 / 3,
                 published={"small": 1.0, "base": 3.0}),
    "pretrain_t2t_mini": dict(generation=M3, file="pretrain_t2t_mini.jsonl", gb=1.2, kind="pretrain", seq=340,
                              lang="zh", work=1.0, published={"minimind3": 1.21, "minimind3-moe": 1.69}),
    "sft_t2t_mini": dict(generation=M3, file="sft_t2t_mini.jsonl", gb=1.6, kind="sft", seq=768, lang="zh", work=1.0,
                         published={"minimind3": 1.10, "minimind3-moe": 1.54}),
    "toolcall": dict(generation=M3, file="(tool-call SFT)", gb=None, kind="sft", seq=768, lang="mixed", work=1.0,
                     published={"minimind3": 0.9, "minimind3-moe": 1.26}),
    "rlaif": dict(generation=M3, file="rlaif.jsonl", gb=None, kind=None, seq=768, lang="zh", work=None,
                  published={"minimind3": 1.1, "minimind3-moe": 1.54}),
    "pretrain_t2t": dict(generation=M3, file="pretrain_t2t.jsonl", gb=10.0, kind="pretrain", seq=340, lang="zh",
                         work=1.0, published={}),
    "sft_t2t": dict(generation=M3, file="sft_t2t.jsonl", gb=14.0, kind="sft", seq=768, lang="zh", work=1.0,
                    published={}),
}
HEADLINE = ("pretrain", "sft_mini_512")
TARGET_HOURS, TARGET_YUAN = 0.7, 1.0
ZERO = ("pretrain_t2t_mini", "sft_t2t_mini")  # minimind-3's "Zero" model (its published hours add up to 2.31 / 3.23)
RTX3090 = {"name": "RTX 3090", "tflops": 71.0, "GBps": 936.0, "memory_GiB": 24.0}
# dense bf16 TFLOP/s, GB/s; matched by substring of the device name in this order, so the PCIe / NVL / 40 GB
# versions (lower clocks or bandwidth) come before the SXM name they contain
DATASHEET = {"H200 NVL": (835.0, 4800.0), "H100 NVL": (835.0, 3900.0), "H100 PCIe": (756.0, 2000.0),
             "A100-SXM4-40GB": (312.0, 1555.0), "A100-PCIE-40GB": (312.0, 1555.0),
             "H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0), "RTX 3090": (71.0, 936.0),
             "RTX 4090": (165.0, 1008.0), "L40S": (362.0, 864.0)}


def generation(preset):
    return M3 if PRESETS[preset].get("qk_norm") else M2


def estimate_tokens(stage):
    """Tokens of one epoch from the published file size, or None where no size is published."""
    s = STAGES[stage]
    return None if s["gb"] is None else s["gb"] * GB / BYTES_PER_TOKEN[s["lang"]]


def count_tokens(stage, path):
    """Useful tokens of one epoch of `path`, through the project's pipeline (packing / bucketing included)."""
    from minimind.data import build_loader
    from minimind.tokenizer import load_tokenizer
    s = STAGES[stage]
    if s["kind"] is None:
        raise SystemExit(f"bench.cost: --data {stage}=...: {stage} is not an LM stage (no token count)")
    loader = build_loader(s["kind"], path, load_tokenizer(), max_seq_len=s["seq"], batch_size=1, pack=True)
    return int(loader.stats()["tokens"])


def hours(tokens, epochs, work, tokens_per_s):
    """Wall-clock hours to train `tokens` x `epochs` at `tokens_per_s` useful tokens/s (work: relative cost)."""
    return tokens * epochs * work / tokens_per_s / 3600


def roofline_3090_step_s(step_s, processed_tokens, flops_per_token, matmul_rate, here):
    """Projected 3090 step time (s) from a step measured here, as (low, high); see the module docstring.
    matmul_rate: flop/s measured here; here: (datasheet TFLOP/s, datasheet GB/s) of this GPU.
    high: the non-matmul rest is bandwidth-bound (scaled by the bandwidth ratio); low: it is launch / host
    overhead (not scaled)."""
    t_mm = min(processed_tokens * flops_per_token / matmul_rate, step_s)
    peak_tflops, bandwidth = here
    t_mm_3090 = t_mm * peak_tflops / RTX3090["tflops"]
    return t_mm_3090 + (step_s - t_mm), t_mm_3090 + (step_s - t_mm) * bandwidth / RTX3090["GBps"]


def _datasheet(device_name):
    for key, value in DATASHEET.items():
        if key in (device_name or ""):
            return value
    return None


def pick_rows(throughput, preset, seq):
    """(ours, minimind2, note) rows for a preset at seq (nearest measured seq_len if that one is missing)."""
    ok = [r for r in throughput.get("results", []) if r.get("status") == "ok" and r["preset"] == preset]
    if not ok:
        return None, None, "not measured"
    seqs = sorted({r["seq_len"] for r in ok}, key=lambda s: (abs(s - seq), -s))
    at = seqs[0]
    rows = [r for r in ok if r["seq_len"] == at]
    ours = [r for r in rows if r["variant"] != "minimind2"]
    best = max(ours, key=lambda r: r["useful_tokens_per_s"]) if ours else None
    ref = next((r for r in rows if r["variant"] == "minimind2"), None)
    return best, ref, ("" if at == seq else f"seq {at} measured")


def build(throughput, kernels=None, tokens=None, sources=None, epochs=None, price=1.3):
    """The cost document: one row per (model, stage)."""
    tokens, sources, epochs = dict(tokens or {}), dict(sources or {}), dict(epochs or {})
    env = throughput.get("env", {})
    here = _datasheet(env.get("device"))
    ceil = (kernels or {}).get("ceilings") or {}
    if ceil.get("matmul_TFLOPs") and (kernels.get("env") or {}).get("device") == env.get("device"):
        matmul_rate, rate_source = ceil["matmul_TFLOPs"] * 1e12, "the bf16 matmul rate measured here"
    else:  # no kernels.json, or one measured on another device
        matmul_rate = 0.8 * here[0] * 1e12 if here else None
        rate_source = "assumed: 0.8 x this GPU's datasheet peak, no matmul rate measured on it"
    rows = []
    measured = {r.get("preset") for r in throughput.get("results", [])}
    presets = [p for p in PRESETS if p in measured]
    for preset in presets:
        for stage, s in STAGES.items():
            if s["generation"] != generation(preset):
                continue
            n = tokens.get(stage)
            src = sources.get(stage, "given") if n is not None else "estimate"
            if n is None:
                n = estimate_tokens(stage)
            ep = epochs.get(stage, 1)
            ours, ref, note = pick_rows(throughput, preset, s["seq"])
            row = {"model": preset, "stage": stage, "tokens": n, "token_source": src, "epochs": ep,
                   "seq_len": s["seq"], "note": note, "published_3090_h": None}
            if preset in s["published"]:  # the README's hours are for one epoch
                row["published_3090_h"] = s["published"][preset] * ep
            if n is None or s["work"] is None:  # no size published / an RL stage: MiniMind's hours only
                row.update(token_source="none", note="no data size published; pass --tokens or --data"
                           if s["work"] else "RL (rollouts): not timed by bench.throughput")
                rows.append(row)
                continue
            if ours:
                row.update(variant=ours["variant"], tokens_per_s=ours["useful_tokens_per_s"],
                           hours=hours(n, ep, s["work"], ours["useful_tokens_per_s"]))
                row["yuan"] = row["hours"] * price
                if here and matmul_rate:
                    low, high = roofline_3090_step_s(ours["step_ms"] / 1e3, ours["tokens_per_step"],
                                                     ours["flops_per_token"], matmul_rate, here)
                    row["proj_3090_roofline_h"] = hours(n, ep, s["work"], ours["useful_tokens_per_step"] / high)
                    row["proj_3090_roofline_low_h"] = hours(n, ep, s["work"], ours["useful_tokens_per_step"] / low)
                    row["proj_3090_roofline_yuan"] = row["proj_3090_roofline_h"] * price
                    row["fits_3090"] = (ours.get("peak_GiB") or 0) <= RTX3090["memory_GiB"]
                    if not row["fits_3090"]:
                        row["note"] = f"{row['note']}; needs {ours['peak_GiB']:.0f} GiB > 24 at this batch".lstrip("; ")
            if ref:
                row["minimind2_step_hours_here"] = hours(n, ep, s["work"], ref["useful_tokens_per_s"])
            if ours and ref and row["published_3090_h"]:
                speedup = ours["useful_tokens_per_s"] / ref["useful_tokens_per_s"]
                row["speedup"] = speedup
                row["proj_3090_ratio_h"] = row["published_3090_h"] / speedup
                row["proj_3090_ratio_yuan"] = row["proj_3090_ratio_h"] * price
            rows.append(row)
    headline = _sums(rows, "small", HEADLINE, price)
    for method in ("roofline", "ratio"):
        h, y = headline.get(f"proj_3090_{method}_h"), headline.get(f"proj_3090_{method}_yuan")
        headline[f"target_met_{method}"] = None if h is None else (h < TARGET_HOURS and y < TARGET_YUAN)
    zero = {model: _sums(rows, model, ZERO, price) for model in presets if generation(model) == M3}
    return {"kind": "cost", "env": env, "price_per_hour": price, "bytes_per_token": BYTES_PER_TOKEN,
            "zero": zero,
            "rtx3090": RTX3090, "here_datasheet": here,
            "matmul_rate_TFLOPs": matmul_rate / 1e12 if matmul_rate else None, "matmul_rate_source": rate_source,
            "target": {"hours": TARGET_HOURS, "yuan": TARGET_YUAN, "stages": list(HEADLINE), "model": "small"},
            "headline": headline, "rows": rows, "method": __doc__.split("Tokens per stage")[1]}


def _sums(rows, model, stages, price):
    """The hours and yuan of `model`'s rows over `stages`, added up (None where one of them is missing)."""
    out = {}
    for key in ("hours", "yuan", "proj_3090_roofline_h", "proj_3090_roofline_low_h", "proj_3090_roofline_yuan",
                "proj_3090_ratio_h", "proj_3090_ratio_yuan", "published_3090_h"):
        parts = [r.get(key) for r in rows if r["model"] == model and r["stage"] in stages]
        out[key] = sum(parts) if parts and all(p is not None for p in parts) else None
    if out.get("published_3090_h") is not None:
        out["published_3090_yuan"] = out["published_3090_h"] * price
    return out


def markdown(doc):
    env, h = doc["env"], doc["headline"]
    lines = ["## Training cost", "", report.env_line(env), "",
             f"Price {doc['price_per_hour']} yuan per GPU-hour. Token counts marked 'estimate' come from MiniMind's "
             "published file sizes (see bench/cost.py); 3090 columns are PROJECTIONS, not measurements.", "",
             _method_line(doc), ""]
    cols = [("model", "model"), ("stage", "stage"),
            ("tokens", lambda r: None if r["tokens"] is None else f"{r['tokens']:.3g} ({r['token_source']})"),
            ("epochs", "epochs"), ("ours", "variant"), ("useful tok/s", "tokens_per_s"),
            ("h here", "hours"), ("yuan here", "yuan"), ("minimind2 step, h here", "minimind2_step_hours_here"),
            ("MiniMind2 3090 h (published)", "published_3090_h"),
            ("3090 h, roofline proj.", _roofline_range), ("3090 h, ratio proj.", "proj_3090_ratio_h"),
            ("3090 yuan, roofline proj.", "proj_3090_roofline_yuan"),
            ("3090 yuan, ratio proj.", "proj_3090_ratio_yuan"), ("note", "note")]
    lines.append(report.markdown_table(doc["rows"], cols))
    f = report.fmt
    lines += ["", f"**Headline (MiniMind2-Small, {' + '.join(HEADLINE)}; target < {TARGET_HOURS} h and "
                  f"< {TARGET_YUAN} yuan on a 3090):** MiniMind2 published {f(h.get('published_3090_h'))} h / "
                  f"{f(h.get('published_3090_yuan'))} yuan; ours here {f(h.get('hours'))} h / "
                  f"{f(h.get('yuan'))} yuan; 3090 projection (roofline) {f(h.get('proj_3090_roofline_h'))} h "
                  f"(optimistic bound {f(h.get('proj_3090_roofline_low_h'))} h) / "
                  f"{f(h.get('proj_3090_roofline_yuan'))} yuan -> target "
                  f"{_verdict(h.get('target_met_roofline'), env)}; 3090 projection (ratio) "
                  f"{f(h.get('proj_3090_ratio_h'))} h / {f(h.get('proj_3090_ratio_yuan'))} yuan -> target "
                  f"{_verdict(h.get('target_met_ratio'), env)}."]
    for model, z in doc.get("zero", {}).items():
        lines += ["", f"**minimind-3 Zero ({model}: {' + '.join(ZERO)}):** MiniMind published "
                      f"{f(z.get('published_3090_h'))} h / {f(z.get('published_3090_yuan'))} yuan on a 3090; ours here "
                      f"{f(z.get('hours'))} h / {f(z.get('yuan'))} yuan; 3090 projection (roofline) "
                      f"{f(z.get('proj_3090_roofline_h'))} h (optimistic bound "
                      f"{f(z.get('proj_3090_roofline_low_h'))} h) / {f(z.get('proj_3090_roofline_yuan'))} yuan; "
                      f"3090 projection (ratio) "
                      f"{f(z.get('proj_3090_ratio_h'))} h / {f(z.get('proj_3090_ratio_yuan'))} yuan."]
    return "\n".join(lines)


def _roofline_range(row):
    lo, hi = row.get("proj_3090_roofline_low_h"), row.get("proj_3090_roofline_h")
    return None if hi is None else f"{report.fmt(hi)} (>= {report.fmt(lo)})"


def _method_line(doc):
    here, rate = doc.get("here_datasheet"), doc.get("matmul_rate_TFLOPs")
    roofline = ("not computed (no datasheet numbers for this GPU)" if not (here and rate) else
                f"t_3090 = t_mm x {here[0]:.0f}/{RTX3090['tflops']:.0f} + (t - t_mm) x {here[1]:.0f}/"
                f"{RTX3090['GBps']:.0f}, t = our measured step, t_mm = its FLOPs / {rate:.0f} TFLOP/s "
                f"({doc.get('matmul_rate_source')}); the optimistic bound (>=) leaves t - t_mm unscaled "
                "(launch-bound)")
    return (f"3090 roofline projection: {roofline}. Ratio projection: MiniMind2's published 3090 hours / our "
            "useful-token speedup over the minimind2 step measured in the same run.")


def compact(doc):
    """The short form for the suite's summary: the MiniMind2-Small rows and the headline."""
    small = {**doc, "rows": [r for r in doc["rows"] if r["model"] == "small"]}
    return markdown(small).replace("## Training cost", "## Training cost (MiniMind2-Small rows; all in cost.json)")


def _verdict(met, env):
    if env.get("device_kind") != "cuda":
        return "not evaluated (no GPU measurement)"
    return "not evaluated" if met is None else ("MET (projection)" if met else "MISSED (projection)")


def _pairs(items, flag, cast):
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in STAGES:
            raise SystemExit(f"bench.cost: {flag} {item!r}: expected STAGE=VALUE with STAGE in {list(STAGES)}")
        try:
            out[key] = cast(value)
        except ValueError:
            raise SystemExit(f"bench.cost: {flag} {item!r}: {value!r} is not a valid value") from None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Hours and yuan per stage and model from measured throughput.")
    p.add_argument("--throughput", required=True, help="throughput.json written by bench.throughput")
    p.add_argument("--kernels_json", default=None, help="kernels.json (its measured matmul rate for the projection)")
    p.add_argument("--tokens", nargs="*", default=None, help="STAGE=N tokens per epoch (e.g. pretrain=4.3e8)")
    p.add_argument("--data", nargs="*", default=None, help="STAGE=PATH: count tokens through the pipeline")
    p.add_argument("--epochs", nargs="*", default=None, help="STAGE=N epochs (default 1, as the README's table)")
    p.add_argument("--price_per_hour", type=float, default=1.3, help="yuan per GPU-hour (default: a rented 3090)")
    p.add_argument("--out", default=None, help="folder for cost.json and cost.md")
    args = p.parse_args(argv)
    if not os.path.isfile(args.throughput):
        p.error(f"--throughput {args.throughput}: no such file (run python -m bench.throughput --out DIR first)")
    with open(args.throughput, encoding="utf-8") as f:
        throughput = json.load(f)
    kernels = None
    if args.kernels_json and os.path.isfile(args.kernels_json):
        with open(args.kernels_json, encoding="utf-8") as f:
            kernels = json.load(f)
    tokens = _pairs(args.tokens, "--tokens", lambda v: int(float(v)))
    sources = {k: "given" for k in tokens}
    for stage, path in _pairs(args.data, "--data", str).items():
        if not os.path.isfile(path):
            p.error(f"--data {stage}={path}: no such file")
        tokens[stage], sources[stage] = count_tokens(stage, path), "measured (pipeline)"
    epochs = _pairs(args.epochs, "--epochs", int)
    doc = build(throughput, kernels, tokens, sources, epochs, args.price_per_hour)
    text = markdown(doc)
    if args.out:
        report.write_json(os.path.join(args.out, "cost.json"), doc)
        report.write_text(os.path.join(args.out, "cost.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
