"""Registers, spills and shared memory of every Triton kernel, per case and target (sm_80, sm_86, sm_90).

    python -m bench.compile_report [--kernels rms_norm rope ...] [--cc 80 86 90] [--out DIR]

A thin layer over kernels/aot.py (which compiles ahead of time for real GPUs and reads `cuobjdump -res-usage`):
writes compile_report.json (rows, failures, a per-kernel summary) and compile_report.md. Needs no GPU. Runs with
the real Triton compiler, so TRITON_INTERPRET is removed from this process's environment before triton loads.
"""
import argparse
import os
import sys
import time

from bench import report


def summarize(rows):
    """Per (kernel function, cc): cases, max registers, max spill stack bytes, max shared bytes."""
    out = {}
    for r in rows:
        key = (r["case"].split("[")[0], r["cc"])
        s = out.setdefault(key, {"kernel": key[0], "cc": key[1], "cases": 0, "max_registers": 0,
                                 "max_spill_stack": 0, "max_shared": 0})
        s["cases"] += 1
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["max_spill_stack"] = max(s["max_spill_stack"], r["stack"] + r.get("local", 0))
        s["max_shared"] = max(s["max_shared"], r["shared"], r.get("metadata_shared", 0))
    return list(out.values())


def markdown(doc, format_rows):
    lines = ["## Triton compile report (ahead of time, no GPU needed)", "", report.env_line(doc["env"]), "",
             f"{len(doc['rows'])} case x target compiles, {len(doc['failures'])} failures, "
             f"{sum(1 for s in doc['summary'] if s['max_spill_stack'])} kernel x target pairs with spills.", ""]
    lines.append(report.markdown_table(doc["summary"], [
        ("kernel", "kernel"), ("sm", "cc"), ("cases", "cases"), ("max registers", "max_registers"),
        ("max spill stack (B)", "max_spill_stack"), ("max shared (B)", "max_shared")]))
    if doc["failures"]:
        lines += ["", "Failures:"] + [f"- {name} sm_{cc}: {err[:300]}" for name, cc, err in doc["failures"]]
    lines += ["", "<details><summary>every case</summary>", "", format_rows(doc["rows"]), "", "</details>"]
    return "\n".join(lines)


def compact(doc):
    """The short form for the suite's summary: counts, and the kernels that spill."""
    spills = [s for s in doc["summary"] if s["max_spill_stack"]]
    lines = ["## Triton compile report", "",
             f"{len(doc['rows'])} case x target compiles, {len(doc['failures'])} failures, "
             f"{len(spills)} kernel x target pairs with spills; max registers "
             f"{max((s['max_registers'] for s in doc['summary']), default=0)}."]
    lines += [f"- spills: {s['kernel']} sm_{s['cc']} {s['max_spill_stack']} B" for s in spills]
    lines += [f"- failed: {name} sm_{cc}: {err[:150]}" for name, cc, err in doc["failures"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", nargs="*", default=None, help="kernel files (default: every one kernels/aot.py has)")
    p.add_argument("--cc", nargs="*", type=int, default=None, help="compute capabilities (default 80 86 90)")
    p.add_argument("--out", default=None, help="folder for compile_report.json and compile_report.md")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        if "triton" in sys.modules:
            p.error("TRITON_INTERPRET=1 and triton is already imported; run without TRITON_INTERPRET")
        del os.environ["TRITON_INTERPRET"]
    from kernels import aot
    t0 = time.perf_counter()
    rows, failures = aot.run(args.kernels, tuple(args.cc or aot.TARGETS), report=True)
    doc = {"kind": "compile_report", "env": report.environment(label="ahead-of-time compile (no GPU used)"),
           "targets": list(args.cc or aot.TARGETS), "seconds": time.perf_counter() - t0,
           "summary": summarize(rows), "rows": rows, "failures": [list(f) for f in failures]}
    text = markdown(doc, aot.format_report)
    if args.out:
        report.write_json(os.path.join(args.out, "compile_report.json"), doc)
        report.write_text(os.path.join(args.out, "compile_report.md"), text)
    print(text.split("<details>")[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
