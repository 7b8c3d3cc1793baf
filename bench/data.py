"""Data pipeline speed on this CPU: tokenisation MB/s, token-cache build MB/s, and loader tokens/s.

    python -m bench.data                        # on a generated demo corpus (--pretrain_records documents)
    python -m bench.data --pretrain FILE.jsonl --sft FILE.jsonl --tokenizer DIR

Measures (wall clock, this machine, CPU only):
  tokenize_mb_s      the tokenizer alone, one process, on the pretrain texts (MB of UTF-8 text per second)
  cache_build_mb_s   building the token cache from the JSON Lines file (parse + validate + tokenise + write): in
                     one process on the file's first --sample_mb MB (a copy in a temporary folder), and with
                     --workers processes on the whole file, as the cache training uses (beside the file); a cache
                     already there and fresh is reused, not built again ("reused")
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
from minimind.data.cache import cache_folder
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


def _head(path, out, max_mb) -> Path:
    """The first whole lines of path, up to max_mb MB, copied to out."""
    with open(path, "rb") as src, open(out, "wb") as dst:
        size = 0
        for line in src:
            if size and size + len(line) > max_mb * 1e6:
                break
            dst.write(line)
            size += len(line)
    return Path(out)


def _timed_cache(path, kind, tok, workers) -> dict:
    """Open the cache beside path, building it with `workers` processes if it is missing or stale."""
    meta = cache_folder(path, kind, tok) / "meta.json"
    before = meta.stat().st_mtime_ns if meta.exists() else None
    t0 = time.perf_counter()
    c = load_token_cache(path, kind, tok, num_workers=workers)
    dt = time.perf_counter() - t0
    mb = os.path.getsize(path) / 1e6
    reused = before is not None and meta.stat().st_mtime_ns == before
    return {"mb": mb, "workers": workers, "seconds": dt, "reused": reused, "folder": str(c.folder),
            "cache_build_mb_s": None if reused else mb / dt, "tokens": c.meta["tokens"]}


def bench_cache(tok, path, kind, workers, sample_dir, sample_mb) -> dict:
    """Cache build speed: in one process on the file's first sample_mb MB (a copy in sample_dir), and with `workers`
    processes on the whole file, building the cache training uses (beside the file) unless it is already there
    (then "reused": nothing is built twice)."""
    sample = _head(path, Path(sample_dir) / f"{kind}_head.jsonl", sample_mb)
    return {"in_process": _timed_cache(sample, kind, tok, 0), "parallel": _timed_cache(path, kind, tok, workers)}


def bench_loader(tok, path, kind, max_seq_len, batch_size, max_batches, pack=True) -> dict:
    loader = build_loader(kind, path, tok, max_seq_len=max_seq_len, batch_size=batch_size, pack=pack)
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
    ap.add_argument("--sample_mb", type=float, default=32,
                    help="MB at the start of each file that the in-process build is timed on (default %(default)s)")
    ap.add_argument("--out", default="out/bench/data.json", help="the JSON result (default %(default)s)")
    args = ap.parse_args()

    tok = load_tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.pretrain and args.sft):
            demo = write_demo_data(Path(tmp) / "demo", {"pretrain": args.pretrain_records, "sft": 20000})
        pretrain = Path(args.pretrain) if args.pretrain else demo["pretrain"]
        sft = Path(args.sft) if args.sft else demo["sft"]
        loaders = [("pretrain", pretrain, True), ("pretrain", pretrain, False), ("sft", sft, True), ("sft", sft, False)]
        result = {
            "device": "cpu", "cpu": _cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "tokenizer": str(args.tokenizer or "bundled"), "pretrain_file": str(pretrain), "sft_file": str(sft),
            "tokenize": bench_tokenize(tok, pretrain),
            "cache_build": {kind: bench_cache(tok, path, kind, args.workers, tmp, args.sample_mb)
                            for kind, path in (("pretrain", pretrain), ("sft", sft))},
            "loader": [bench_loader(tok, path, kind, args.max_seq_len, args.batch_size, args.max_batches, pack=pack)
                       for kind, path, pack in loaders],
        }
    result["load_average_after"] = os.getloadavg()
    t = result["tokenize"]
    print(f"CPU: {result['cpu']} ({result['cores']} cores, load average {result['load_average'][0]:.1f})")
    print(f"tokenize      {t['tokenize_mb_s']:8.2f} MB/s  {t['tokens_s'] / 1e6:6.2f} M tokens/s  "
          f"({t['bytes_per_token']:.2f} bytes/token, {t['mb']:.1f} MB)")
    for kind, builds in result["cache_build"].items():
        for name, v in builds.items():
            speed = "  (reused)" if v["reused"] else f"{v['cache_build_mb_s']:8.2f} MB/s"
            print(f"cache {kind:8s} {name:10s} {speed}  ({v['mb']:.1f} MB, {v['workers']} workers, "
                  f"{v['seconds']:.2f} s; {v['folder']})")
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
