"""The token cache: a JSON Lines file tokenised once into flat binary arrays, reused while the file is unchanged.

A cache folder holds, for N sequences with L tokens in all:
    tokens.bin   uint16 (L,)      every sequence's ids back to back (the vocab is under 65,536)
    mask.bin     uint8  (L,)      loss mask, 1 on assistant tokens (chat and dpo kinds only)
    offsets.bin  int64  (N + 1,)  sequence i is tokens[offsets[i]:offsets[i + 1]]
    first_target.bin int64 (N,)   position of the first mask-1 token in each sequence (its length if none)
    meta.json                     source fingerprint, tokenizer hash, counts, skipped records
    system_ok.bin, edit_index.bin, edits.bin, repl_tokens.bin, repl_mask.bin
                                  (chat kinds) what the SFT augmentations need (minimind.data.augment)
    records.bin, record_offsets.bin
                                  (rl) each record's prompt messages, tools and answer as JSON (PromptRecords)
Pretrain sequences are stored wrapped, <|im_start|> text <|im_end|>. Chat (sft, reason) sequences are the rendered
conversations in the tokenizer's chat format (the records checked by that format's rules). DPO record j is stored as
sequence 2j (chosen) and 2j + 1 (rejected). RL record j is its generation prompt (every message but the last, then the
opened assistant turn), stored as sequence V*j + v, v = 0 with thinking off and, for a tokenizer whose template
switches thinking (V = 2), v = 1 with it on. Sequences are stored whole; the loaders truncate to max_seq_len, so one
cache serves every sequence length.

The folder is `<file>.tokcache/<kind>-<tokenizer hash>/` beside the data (or under cache_dir). It is reused when the
source's size, mtime and the hashes of its first and last MiB match, and rebuilt otherwise. Building streams the file
in blocks of lines to worker processes (tokenisation in parallel) and appends their output to the arrays in file
order, so memory holds a few blocks, never the file. A file lock lets concurrent processes (DDP ranks, parallel
tests) share one build; the result appears atomically (built in a temporary folder, then renamed), and the next
build removes what a builder killed mid-way left behind.

    python -m minimind.data --kind sft --data sft_512.jsonl --workers 8     # build ahead of training
"""
import fcntl
import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minimind.chat_template import render
from minimind.data.augment import ChatExtras, chat_extras
from minimind.data.jsonl import DataError, RecordError, iter_line_blocks, parse_record

CACHE_VERSION = 2
MAX_KEPT_ERRORS = 20
FINGERPRINT_BYTES = 1 << 20  # hashed at each end of the source
PARALLEL_MIN_BYTES = 8 << 20  # smaller files are tokenised in-process (starting workers costs more)


def source_fingerprint(path) -> dict:
    """size, mtime and sha1 of the first and last MiB: cheap, and catches edits that keep size and mtime."""
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha1(f.read(FINGERPRINT_BYTES)).hexdigest()
        f.seek(max(0, st.st_size - FINGERPRINT_BYTES))
        tail = hashlib.sha1(f.read()).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha1": head, "tail_sha1": tail}


def cache_kind(kind: str) -> str:
    return "chat" if kind in ("sft", "reason") else kind  # sft and reason share one format and one cache


def cache_folder(path, kind: str, tokenizer, cache_dir=None) -> Path:
    """<file>.tokcache/<kind>-<tokenizer hash> beside the data; under cache_dir when given, or when the data's
    folder is read-only (then ~/.cache/minimind/tokcache)."""
    path = Path(path).resolve()
    name = f"{cache_kind(kind)}-{tokenizer.fingerprint[:12]}"
    if cache_dir is None and not os.access(path.parent, os.W_OK):
        cache_dir = Path.home() / ".cache" / "minimind" / "tokcache"
    if cache_dir is not None:
        tag = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        return Path(cache_dir) / f"{path.name}-{tag}.tokcache" / name
    return path.parent / f"{path.name}.tokcache" / name


@dataclass
class PromptRecords:
    """rl kind: what the rewards need of record i (its prompt messages, tools, answer), JSON read on demand."""
    records: np.ndarray  # uint8 (bytes,): the records' JSON back to back
    record_offsets: np.ndarray  # int64 (N + 1,)

    FILES = (("records", np.uint8), ("record_offsets", np.int64))

    def __getitem__(self, i: int) -> dict:
        """{"messages": [...], "tools": [...] or None, "answer": str or None}"""
        return json.loads(self.records[self.record_offsets[i]:self.record_offsets[i + 1]].tobytes())


@dataclass
class TokenCache:
    folder: Path
    tokens: np.ndarray  # uint16 memmap (L,)
    mask: Optional[np.ndarray]  # uint8 memmap (L,) or None
    offsets: np.ndarray  # int64 (N + 1,)
    first_target: Optional[np.ndarray]  # int64 (N,) or None
    meta: dict
    extras: Optional[object] = None  # chat kinds: ChatExtras (what the SFT augmentations need); rl: PromptRecords

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def sequence(self, i):
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], None if self.mask is None else self.mask[lo:hi]


def _open(folder: Path) -> TokenCache:
    meta = json.loads((folder / "meta.json").read_text())
    offsets = np.fromfile(folder / "offsets.bin", dtype=np.int64)
    n = int(offsets[-1])
    tokens = np.memmap(folder / "tokens.bin", dtype=np.uint16, mode="r", shape=(n,)) if n else np.zeros(0, np.uint16)
    mask = None
    if meta["has_mask"]:
        mask = np.memmap(folder / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
    first = np.fromfile(folder / "first_target.bin", dtype=np.int64) if meta["has_mask"] else None
    extras = None
    if meta["kind"] == "chat":
        arrays = {name: np.fromfile(folder / f"{name}.bin", dtype=dt) for name, dt in ChatExtras.FILES}
        arrays["edits"] = arrays["edits"].reshape(-1, 4)
        extras = ChatExtras(**arrays)
    elif meta["kind"] == "rl":
        extras = PromptRecords(**{name: np.fromfile(folder / f"{name}.bin", dtype=dt) for name, dt in
                                  PromptRecords.FILES})
    return TokenCache(folder, tokens, mask, offsets, first, meta, extras)


# ---- worker side: one block of lines -> arrays ----

_TOKENIZER = None


def _set_tokenizer(tokenizer):
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _init_worker(tokenizer):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _set_tokenizer(tokenizer)


def encode_block(kind: str, first_line: int, lines):
    """Parse, validate and tokenise one block. Returns (tokens uint16, mask uint8 or None, lengths int64,
    first_target int64 or None, records, errors [(line, message)], extras or None: chat kinds augment.chat_extras,
    rl (record JSON bytes, records without an answer, the line of the first)); bad records are left out and
    reported."""
    tok, records, errors, extras, no_answer = _TOKENIZER, [], [], None, []
    for i, line in enumerate(lines):
        try:
            rec = parse_record(kind, line, tok.chat_format)
        except RecordError as e:
            errors.append((first_line + i, str(e)))
            continue
        if rec is not None:
            records.append(rec)
            if kind == "rl" and rec[2] is None:
                no_answer.append(first_line + i)
    if kind == "pretrain":
        seqs = [np.asarray([tok.bos_id] + ids + [tok.eos_id], dtype=np.int64) for ids in tok.encode_batch(records)]
        masks = first = None
    elif kind == "rl":
        thinking = (False, True) if tok.supports_thinking else (False,)
        prompts = [render(tok.format, messages, tools, add_generation_prompt=True, thinking=t)[0]
                   for messages, tools, _ in records for t in thinking]
        seqs = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_batch(prompts)]
        masks = first = None
        blobs = [json.dumps({"messages": m, "tools": t, "answer": a}, ensure_ascii=False).encode("utf-8")
                 for m, t, a in records]
        extras = (blobs, len(no_answer), no_answer[0] if no_answer else None)
    else:
        convs = [c for pair in records for c in pair] if kind == "dpo" else records
        rendered = [render(tok.format, messages, tools) for messages, tools in convs]
        encoded = tok.encode_rendered(rendered)
        if kind != "dpo":
            extras = chat_extras(tok, convs, rendered, encoded)
        seqs, masks = [ids for ids, _ in encoded], [m for _, m in encoded]
        first = np.asarray([int(m.argmax()) if m.any() else len(m) for m in masks], dtype=np.int64)
    lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
    tokens = np.concatenate(seqs).astype(np.uint16) if seqs else np.zeros(0, np.uint16)
    mask = None if masks is None else (np.concatenate(masks) if masks else np.zeros(0, np.uint8))
    return tokens, mask, lengths, first, len(records), errors, extras


# ---- main side ----

def _default_workers(path) -> int:
    if os.path.getsize(path) < PARALLEL_MIN_BYTES:
        return 0
    return max(1, min(os.cpu_count() or 1, 8))


def _pool(num_workers, tokenizer):
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ctx.Pool(num_workers, initializer=_init_worker, initargs=(tokenizer,))


def _build(path: Path, kind: str, tokenizer, folder: Path, skip_bad_records: bool, num_workers: int) -> None:
    if tokenizer.vocab_size > 65536:
        raise ValueError(f"vocab size {tokenizer.vocab_size} does not fit the uint16 token cache")
    t0 = time.time()
    # the caller holds the folder's lock, so every temporary folder of it is from a builder that was killed mid-way
    for stale in folder.parent.glob(f"{glob.escape(folder.name)}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    has_mask = kind not in ("pretrain", "rl")
    has_extras = cache_kind(kind) == "chat"
    lengths, firsts, n_records, n_skipped, kept_errors = [], [], 0, 0, []
    extra_files = {name: open(tmp / f"{name}.bin", "wb") for name, _ in ChatExtras.FILES} if has_extras else {}
    if kind == "rl":
        extra_files = {name: open(tmp / f"{name}.bin", "wb") for name, _ in PromptRecords.FILES}
    edit_counts, n_repl = [np.zeros(1, np.int64)], 0
    record_sizes, no_answer = [np.zeros(1, np.int64)], {"records_without_answer": 0, "first_without_answer": None}
    pool = _pool(num_workers, tokenizer) if num_workers > 0 else None
    if pool is None:
        _set_tokenizer(tokenizer)
    try:
        with open(tmp / "tokens.bin", "wb") as ftok, open(tmp / "mask.bin", "wb") as fmask:
            def consume(result):
                nonlocal n_records, n_skipped, n_repl
                tokens, mask, lens, first, nrec, errors, extras = result
                if errors and not skip_bad_records:
                    line, msg = errors[0]
                    raise DataError(f"{path}:{line}: {msg} (pass skip_bad_records=True / --skip_bad_records "
                                    f"to skip bad records)")
                n_skipped += len(errors)
                kept_errors.extend(f"{path}:{line}: {msg}" for line, msg in errors[:MAX_KEPT_ERRORS - len(kept_errors)])
                n_records += nrec
                ftok.write(tokens.tobytes())
                if has_mask:
                    fmask.write(mask.tobytes())
                    firsts.append(first)
                lengths.append(lens)
                if kind == "rl":
                    blobs, n_missing, first_missing = extras
                    extra_files["records"].write(b"".join(blobs))
                    record_sizes.append(np.asarray([len(b) for b in blobs], dtype=np.int64))
                    no_answer["records_without_answer"] += n_missing
                    if no_answer["first_without_answer"] is None and first_missing is not None:
                        no_answer["first_without_answer"] = f"{path}:{first_missing}"
                if has_extras:
                    system_ok, counts, edits, repl_tokens, repl_mask = extras
                    edits = edits + np.asarray([0, 0, n_repl, n_repl])  # offsets into the whole file's arrays
                    n_repl += len(repl_tokens)
                    edit_counts.append(counts)
                    for name, array in (("system_ok", system_ok), ("edits", edits), ("repl_tokens", repl_tokens),
                                        ("repl_mask", repl_mask)):
                        extra_files[name].write(array.tobytes())

            blocks = iter_line_blocks(path)
            if pool is None:
                for first_line, lines in blocks:
                    consume(encode_block(kind, first_line, lines))
            else:
                pending = deque()  # in file order; at most 2 blocks per worker in flight
                for first_line, lines in blocks:
                    pending.append(pool.apply_async(encode_block, (kind, first_line, lines)))
                    if len(pending) >= 2 * num_workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
        if has_extras:
            extra_files["edit_index"].write(np.cumsum(np.concatenate(edit_counts)).tobytes())
        if kind == "rl":
            extra_files["record_offsets"].write(np.cumsum(np.concatenate(record_sizes)).tobytes())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for f in extra_files.values():
            f.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    offsets.tofile(tmp / "offsets.bin")
    if has_mask:
        (np.concatenate(firsts) if firsts else np.zeros(0, np.int64)).tofile(tmp / "first_target.bin")
    else:
        (tmp / "mask.bin").unlink()
    meta = {"version": CACHE_VERSION, "kind": cache_kind(kind), "source": str(path),
            "fingerprint": source_fingerprint(path), "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "has_mask": has_mask, "records": n_records,
            "sequences": int(len(lens)), "tokens": int(offsets[-1]), "skipped_records": n_skipped,
            "errors": kept_errors, "workers": num_workers, "build_seconds": round(time.time() - t0, 3)}
    if kind == "rl":  # prompts per record: thinking off (and on, where the template switches it)
        meta.update(variants=2 if tokenizer.supports_thinking else 1, **no_answer)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _is_fresh(folder: Path, path: Path, tokenizer) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("version") == CACHE_VERSION and meta.get("tokenizer") == tokenizer.fingerprint
            and meta.get("fingerprint") == source_fingerprint(path))


def load_token_cache(path, kind: str, tokenizer, *, cache_dir=None, skip_bad_records=False,
                     num_workers: Optional[int] = None) -> TokenCache:
    """The token cache of `path` (built now if missing or stale). Raises DataError for bad records unless
    skip_bad_records, in which case they are counted (meta["skipped_records"]) and a warning names the first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    folder = cache_folder(path, kind, tokenizer, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and then reuse its result
        if not _is_fresh(folder, path, tokenizer):
            workers = _default_workers(path) if num_workers is None else num_workers
            _build(path.resolve(), kind, tokenizer, folder, skip_bad_records, workers)
        cache = _open(folder)
    skipped = cache.meta["skipped_records"]
    if skipped and not skip_bad_records:
        raise DataError(f"{cache.meta['errors'][0]} (and {skipped - 1} more bad records; pass "
                        f"skip_bad_records=True / --skip_bad_records to skip them)")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} bad records of {skipped + cache.meta['records']}; first: "
                      f"{cache.meta['errors'][0]}", stacklevel=2)
    return cache

