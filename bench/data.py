"""Data pipeline speed on this CPU: tokenisation MB/s, token-cache build MB/s, and loader tokens/s.

    python -m bench.data                        # on a generated demo corpus (--pretrain_records documents)
    python -m bench.data --pretrain FILE.jsonl --sft FILE.jsonl --tokenizer DIR

Measures (wall clock, this machine, CPU only):
  tokenize_mb_s      the tokenizer alone, one process, on the pretrain texts (MB of UTF-8 text per second)
  cache_build_mb_s   building the token cache from the JSON Lines file (parse + validate + tokenise + write),
                     in-process and with --workers processes
  loader_tokens_s    batches from the cache as int64 tensors, per loader kind: tokens (incl. padding) per second
Prints a table and writes JSON (--out). The machine's load average is recorded: on a shared machine the numbers
are lower bounds.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from minimind.data import build_loader, load_token_cache
from minimind.demo import write_demo_data
from minimind.tokenizer import load_tokenizer


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_tokenize(tok, path, max_mb=8.0) -> dict:
    texts, size = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            texts.append(t)
            size += len(t.encode("utf-8"))
            if size > max_mb * 1e6:
                break
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    dt = time.perf_counter() - t0
    return {"mb": size / 1e6, "seconds": dt, "tokenize_mb_s": size / 1e6 / dt, "tokens_s": n_tokens / dt,
            "bytes_per_token": size / n_tokens}


def bench_cache(tok, path, kind, workers, cache_root) -> dict:
    mb = os.path.getsize(path) / 1e6
    out = {}
    for w in sorted({0, workers}):
        t0 = time.perf_counter()
        c = load_token_cache(path, kind, tok, cache_dir=Path(cache_root) / f"w{w}", num_workers=w)
        dt = time.perf_counter() - t0
        out[f"workers_{w}"] = {"seconds": dt, "cache_build_mb_s": mb / dt, "tokens": c.meta["tokens"]}
    return {"mb": mb, **out}


def bench_loader(tok, path, kind, cache_root, max_seq_len, batch_size, max_batches, pack=True) -> dict:
    loader = build_loader(kind, path, tok, max_seq_len=max_seq_len, batch_size=batch_size, pack=pack,
                          cache_dir=Path(cache_root) / "w0")
    stats = loader.stats()
    n_batches, n_tokens, t0 = 0, 0, time.perf_counter()
    for epoch in range(1000):
        loader.set_epoch(epoch)
        for b in loader:
            n_tokens += sum(v.numel() for k, v in b.items() if k.endswith("input_ids"))
            n_batches += 1
            if n_batches >= max_batches:
                break
        if n_batches >= max_batches:
            break
    dt = time.perf_counter() - t0
    return {"kind": kind, "pack": pack, "max_seq_len": max_seq_len, "batch_size": batch_size, "batches": n_batches,
            "loader_tokens_s": n_tokens / dt, "batches_s": n_batches / dt,
            "padding_fraction": stats["padding_fraction"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", help="pretrain JSON Lines file (default: generated demo data)")
    ap.add_argument("--sft", help="SFT JSON Lines file (default: generated demo data)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled one)")
    ap.add_argument("--pretrain_records", type=int, default=60000, help="size of the generated pretrain file")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the parallel build")
    ap.add_argument("--max_seq_len", type=int, default=512, help="loader row length (default %(default)s)")
    ap.add_argument("--batch_size", type=int, default=32, help="loader rows per batch (default %(default)s)")
    ap.add_argument("--max_batches", type=int, default=2000, help="batches timed per loader (default %(default)s)")
    ap.add_argument("--out", default="out/bench/data.json", help="the JSON result (default %(default)s)")
    args = ap.parse_args()

    tok = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.pretrain and args.sft):
            demo = write_demo_data(Path(tmp) / "demo", {"pretrain": args.pretrain_records, "sft": 20000})
        pretrain = Path(args.pretrain) if args.pretrain else demo["pretrain"]
        sft = Path(args.sft) if args.sft else demo["sft"]
        cache_root = Path(tmp) / "cache"
        result = {
            "device": "cpu", "cpu": _cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "tokenizer": str(args.tokenizer or "bundled"), "pretrain_file": str(pretrain), "sft_file": str(sft),
            "tokenize": bench_tokenize(tok, pretrain),
            "cache_build": {"pretrain": bench_cache(tok, pretrain, "pretrain", args.workers, cache_root),
                            "sft": bench_cache(tok, sft, "sft", args.workers, cache_root)},
            "loader": [bench_loader(tok, pretrain, "pretrain", cache_root, args.max_seq_len, args.batch_size,
                                    args.max_batches),
                       bench_loader(tok, pretrain, "pretrain", cache_root, args.max_seq_len, args.batch_size,
                                    args.max_batches, pack=False),
                       bench_loader(tok, sft, "sft", cache_root, args.max_seq_len, args.batch_size,
                                    args.max_batches),
                       bench_loader(tok, sft, "sft", cache_root, args.max_seq_len, args.batch_size,
                                    args.max_batches, pack=False)],
        }
    result["load_average_after"] = os.getloadavg()
    t = result["tokenize"]
    print(f"CPU: {result['cpu']} ({result['cores']} cores, load average {result['load_average'][0]:.1f})")
    print(f"tokenize      {t['tokenize_mb_s']:8.2f} MB/s  {t['tokens_s'] / 1e6:6.2f} M tokens/s  "
          f"({t['bytes_per_token']:.2f} bytes/token, {t['mb']:.1f} MB)")
    for kind, c in result["cache_build"].items():
        for k, v in c.items():
            if k.startswith("workers_"):
                print(f"cache {kind:8s} {k:10s} {v['cache_build_mb_s']:8.2f} MB/s  ({c['mb']:.1f} MB, "
                      f"{v['seconds']:.2f} s)")
    for r in result["loader"]:
        print(f"loader {r['kind']:8s} pack={str(r['pack']):5s} {r['loader_tokens_s'] / 1e6:8.2f} M tokens/s  "
              f"{r['batches_s']:8.0f} batches/s  padding {r['padding_fraction']:.3f}  "
              f"(B={r['batch_size']}, T<={r['max_seq_len']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
