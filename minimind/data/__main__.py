"""Build (or check) a token cache ahead of training: python -m minimind.data --kind sft --data FILE.jsonl"""
import argparse
import json
import sys

from minimind.data.cache import load_token_cache
from minimind.data.jsonl import DataError
from minimind.tokenizer import load_tokenizer


def main():
    ap = argparse.ArgumentParser(description="Build (or check) the token cache of a JSON Lines file.")
    ap.add_argument("--data", required=True, help="the JSON Lines file; its cache goes beside it (FILE.tokcache/)")
    ap.add_argument("--kind", required=True, choices=("pretrain", "sft", "reason", "dpo", "rl"),
                    help="the file's format (sft and reason share one cache)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled one)")
    ap.add_argument("--cache_dir", default=None, help="put the cache here instead of beside the file")
    ap.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: one per core)")
    ap.add_argument("--skip_bad_records", action="store_true",
                    help="skip and count malformed lines instead of stopping at the first")
    args = ap.parse_args()
    try:
        cache = load_token_cache(args.data, args.kind, load_tokenizer(args.tokenizer), cache_dir=args.cache_dir,
                                 skip_bad_records=args.skip_bad_records, num_workers=args.workers)
    except (DataError, OSError, ValueError) as e:  # a bad record (FILE:LINE: ...), a missing file or tokenizer
        print(f"python -m minimind.data: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(cache.folder)
    print(json.dumps({k: v for k, v in cache.meta.items() if k != "errors"}, indent=1))


if __name__ == "__main__":
    main()
