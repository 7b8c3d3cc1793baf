"""Write the demo data set: pretrain.jsonl, tools.jsonl (calculator conversations, minimind.demo.tools), sft.jsonl,
dpo.jsonl, reason.jsonl, grpo.jsonl (prompts with an `answer`) and the held-out eval.jsonl.

    python -m minimind.demo.data --out out/demo_data

Sizes are small (pretrain is about 0.4M tokens with the bundled tokenizer); generation takes about a second.
The quiz needs name -> attribute lookups a few tokens back; a tiny model (hidden 128, 4 layers) learns such
lookups only after a long plateau, so it needs many optimizer steps (small batches of short rows), not just many
tokens. Hence a small world (12 people) whose facts each recur a few hundred times, in one canonical sentence
half of the time, with the fact right after the name and verb ("Liyan likes red.").
Deterministic: the same files on every run (for the same sizes; a larger size gives a longer draw from the same
world, e.g. the tokenizer's training corpus, --pretrain 40000).
"""
import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Dict

from minimind.demo.world import SEED, World

SIZES = {"pretrain": 6400, "sft": 3000, "dpo": 800, "reason": 800, "grpo": 960, "tools": 6400}  # records


def _write(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_demo_data(out_dir, sizes: Dict[str, int] = None) -> Dict[str, Path]:
    """Write the six training files and eval.jsonl into out_dir; returns {"pretrain", "sft", "dpo", "reason",
    "grpo", "tools", "eval"} -> path. sizes overrides the record counts (e.g. smaller ones for tests)."""
    from minimind.demo import tools
    sizes = {**SIZES, **(sizes or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World()
    paths = {}
    for i, (kind, make) in enumerate([("pretrain", world.pretrain_records), ("sft", world.sft_records),
                                      ("dpo", world.dpo_records), ("reason", world.reason_records),
                                      ("grpo", world.grpo_records), ("tools", tools.sft_records)]):
        paths[kind] = out / f"{kind}.jsonl"
        _write(paths[kind], make(sizes[kind], random.Random(SEED + 100 + i)))
    paths["eval"] = out / "eval.jsonl"
    _write(paths["eval"], (asdict(item) for item in world.quiz()))
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo_data", help="output folder")
    for kind, n in SIZES.items():
        ap.add_argument(f"--{kind}", type=int, default=n, help=f"{kind} records (default {n})")
    args = ap.parse_args()
    for kind, path in write_demo_data(args.out, {k: getattr(args, k) for k in SIZES}).items():
        print(f"{kind:8s} {path}  ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
