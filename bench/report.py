"""Writing benchmark results: the environment header, JSON files and markdown tables every harness shares, and
the one-page summary of a bench/gpu_suite.sh run (`python -m bench.report OUTDIR` writes OUTDIR/summary.md).

Every result file is one JSON object {"env": environment(), "kind": ..., ...harness fields...}; env says on what
the numbers were measured (device name, torch and triton versions, date, git commit), so a CPU smoke run can never
be mistaken for a GPU result ("device_kind": "cpu" and "label": "CPU smoke ...").
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys


def environment(label=None):
    """Where and with what the numbers were measured."""
    import torch
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_kind": "cuda" if torch.cuda.is_available() else "cpu",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "git_commit": _git_commit(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["multiprocessors"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2 ** 30, 1)
    if label:
        env["label"] = label
    return env


def _git_commit():
    """The short commit (+dirty) of this checkout; else $BENCH_GIT_COMMIT (a copied tree may have no .git)."""
    return _git_describe() or os.environ.get("BENCH_GIT_COMMIT") or None


def _git_describe():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=os.path.dirname(os.path.abspath(__file__)))
        if out.returncode:
            return None
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path, obj):
    """Write obj as JSON atomically (a killed run never leaves half a file). NaN/inf become null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(obj), f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def fmt(value, digits=3):
    """A table cell: '-' for None, numbers to `digits` significant figures (integers as they are)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    return str(value)


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (header, key or callable(row)). Missing values print as '-'."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt(key(r) if callable(key) else r.get(key)) for _, key in columns]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def env_line(env):
    """One markdown line naming the machine: never let a CPU number pass for a GPU one."""
    where = env.get("label") or ("GPU" if env.get("device_kind") == "cuda" else "CPU")
    return (f"_{where}: {env.get('device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, commit {env.get('git_commit')}, {env.get('date_utc')}_")


def _tests_verdict(log_path):
    """The pytest outcome from its log: the final counts line, or (cut off by a timeout) the per-test tallies."""
    if not os.path.isfile(log_path):
        return "no test log"
    text = open(log_path, encoding="utf-8", errors="replace").read()
    lines = text.splitlines()
    final = [ln for ln in lines if re.search(r"\d+ (passed|failed|error)", ln) and ln.startswith("=")]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    if final:
        head = final[-1]
    else:
        head = (f"no final pytest line (cut off?): {text.count(' PASSED')} PASSED, {text.count(' FAILED')} FAILED, "
                f"{text.count(' ERROR')} ERROR so far")
    return "\n".join([head] + failed[:25])


def summary(out_dir):
    """summary.md of a gpu_suite run: machine, part exit codes, tests, then each harness's compact table."""
    from bench import compile_report, cost, kernels, rl, throughput
    try:
        with open(os.path.join(out_dir, "env.json"), encoding="utf-8") as f:
            env = json.load(f)
    except (OSError, ValueError):  # the environment step failed: its log says why
        env = {}
    lines = [f"# GPU suite {env.get('date_utc', '')[:10]} on {env.get('device', '?')}", "", env_line(env),
             f"compute capability {env.get('compute_capability')}, liger-kernel {env.get('liger_kernel')}, "
             f"flash-attn {env.get('flash_attn')}", "", "| part | exit code | seconds |", "|---|---|---|"]
    parts = os.path.join(out_dir, "parts.txt")
    if os.path.isfile(parts):
        lines += open(parts, encoding="utf-8").read().strip().splitlines()
    lines += ["", "## Parity tests (compiled on this GPU)", "", "```",
              _tests_verdict(os.path.join(out_dir, "tests.log")), "```"]
    for name, module in (("kernels", kernels), ("throughput", throughput), ("cost", cost), ("rl", rl),
                         ("compile_report", compile_report)):
        path = os.path.join(out_dir, f"{name}.json")
        lines.append("")
        if not os.path.isfile(path):
            lines.append(f"## {name}: no result (see {name}.log in logs.tar.gz)")
            continue
        try:
            with open(path, encoding="utf-8") as f:
                lines.append(module.compact(json.load(f)))
        except Exception as e:  # a broken part must not take the summary down
            lines.append(f"## {name}: could not summarise {path}: {type(e).__name__}: {e}")
    path = os.path.join(out_dir, "benchmarks.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                lines += ["", benchmarks_compact(json.load(f))]
        except Exception as e:
            lines += ["", f"## benchmarks: could not summarise {path}: {type(e).__name__}: {e}"]
    return "\n".join(lines)


def benchmarks_compact(doc):
    """pytest-benchmark's JSON (bench/test_*_benchmarks.py) as one table: median and rounds, and the rates each
    benchmark put in its extra_info."""
    rows = [{"benchmark": b["name"], "median ms": b["stats"]["median"] * 1e3, "rounds": b["stats"]["rounds"],
             "extra": ", ".join(f"{k} {fmt(v)}" for k, v in (b.get("extra_info") or {}).items())}
            for b in doc.get("benchmarks", [])]
    return "\n".join(["## pytest-benchmark (bench/test_*_benchmarks.py)", "",
                      markdown_table(rows, [(k, k) for k in ("benchmark", "median ms", "rounds", "extra")])])


def main(argv=None):
    p = argparse.ArgumentParser(description="Write OUTDIR/summary.md for a bench/gpu_suite.sh run and print it.")
    p.add_argument("out_dir", help="the folder bench/gpu_suite.sh wrote")
    args = p.parse_args(argv)
    text = summary(args.out_dir)
    write_text(os.path.join(args.out_dir, "summary.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
