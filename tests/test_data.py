"""The data pipeline: formats and loss masks, the token cache, packing, shuffling, resume, DDP shards, bad input."""
import json
import os
import random
import warnings

import numpy as np
import pytest

from minimind.data import DataError, build_loader, load_token_cache
from minimind.tokenizer import load_tokenizer
from tests.train_helpers import minimind2_loss_mask


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def texts(n, seed=0):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "数据", "模型", "delta", "7", "42", "Oskadra", "红色"]
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 60))) for _ in range(n)]


def conversation(rng, turns=None, system=False):
    conv = [{"role": "system", "content": "Be brief."}] if system else []
    for _ in range(turns or rng.randrange(1, 4)):
        conv.append({"role": "user", "content": " ".join(["question"] * rng.randrange(1, 30))})
        conv.append({"role": "assistant", "content": " ".join(["answer"] * rng.randrange(1, 30))})
    return conv


@pytest.fixture
def pretrain_file(tmp_path):
    return write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in texts(300)])


@pytest.fixture
def sft_file(tmp_path):
    rng = random.Random(1)
    return write_jsonl(tmp_path / "sft.jsonl",
                       [{"conversations": conversation(rng, system=i % 5 == 0)} for i in range(200)])


@pytest.fixture
def dpo_file(tmp_path):
    rng = random.Random(2)
    recs = []
    for _ in range(120):
        user = {"role": "user", "content": "q " * rng.randrange(1, 20)}
        recs.append({"chosen": [user, {"role": "assistant", "content": "good " * rng.randrange(1, 20)}],
                     "rejected": [user, {"role": "assistant", "content": "bad " * rng.randrange(1, 40)}]})
    return write_jsonl(tmp_path / "dpo.jsonl", recs)


def independent_labels(tok, conversation, max_len):
    """(ids, labels) of a conversation truncated to max_len, not from encode_chat (which builds the cache): the ids
    of the rendered template text, and labels by MiniMind2's rule written out in tests/train_helpers.py."""
    ids = tok.encode(tok.apply_chat_template(conversation))
    labels = [t if m else -100 for t, m in zip(ids, minimind2_loss_mask(ids, tok))]
    return ids[:max_len], labels[:max_len]


def all_batches(loader):
    return [b for b in loader]


# ---- formats and masks ----

def test_pretrain_packed_rows_hold_every_token_once(tok, pretrain_file):
    L = 32
    loader = build_loader("pretrain", pretrain_file, tok, max_seq_len=L, batch_size=4, drop_last=False)
    stream = np.concatenate([[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts(300)])
    rows = len(stream) // L
    got = {}
    for batch_rows, batch in zip(loader.plan(), all_batches(loader)):
        assert batch["input_ids"].shape[1] == L
        assert (batch["labels"] == batch["input_ids"]).all() and batch["attention_mask"].all()
        for r, row in zip(batch_rows, batch["input_ids"].numpy()):
            assert r not in got
            got[r] = row
    assert sorted(got) == list(range(rows))  # every row exactly once
    np.testing.assert_array_equal(np.concatenate([got[r] for r in range(rows)]), stream[:rows * L])
    s = loader.stats()
    assert s["padding_fraction"] == 0.0 and s["dropped_tokens"] == len(stream) - rows * L < L
    assert s["tokens"] == rows * L


def test_pretrain_pad_to_max(tok, pretrain_file):
    L = 24
    loader = build_loader("pretrain", pretrain_file, tok, max_seq_len=L, batch_size=8, pack=False, drop_last=False)
    docs = [[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts(300)]
    seen = 0
    for idx, batch in zip(loader.plan(), all_batches(loader)):
        assert batch["input_ids"].shape == (len(idx), L)
        for i, ids, labels, attn in zip(idx, batch["input_ids"], batch["labels"], batch["attention_mask"]):
            doc = docs[i][:L]
            n = len(doc)
            assert ids[:n].tolist() == doc and (ids[n:] == 0).all()
            assert labels[:n].tolist() == doc and (labels[n:] == -100).all()
            assert attn[:n].all() and not attn[n:].any()
            seen += 1
    assert seen == 300
    assert loader.stats()["padding_fraction"] > 0


@pytest.mark.parametrize("kind", ["sft", "reason"])
def test_chat_labels_are_the_assistant_mask(tok, sft_file, kind):
    L = 96
    records = [json.loads(line) for line in open(sft_file, encoding="utf-8")]
    loader = build_loader(kind, sft_file, tok, max_seq_len=L, batch_size=8, drop_last=False)
    n = 0
    for idx, batch in zip(loader.plan(), all_batches(loader)):
        T = batch["input_ids"].shape[1]
        assert T <= L
        for i, ids, labels, attn in zip(idx, batch["input_ids"], batch["labels"], batch["attention_mask"]):
            want_ids, want_labels = independent_labels(tok, records[i]["conversations"], L)
            k = len(want_ids)
            assert ids[:k].tolist() == want_ids and (ids[k:] == 0).all() and attn.sum() == k
            assert labels[:k].tolist() == want_labels
            assert (labels[k:] == -100).all()
            n += 1
    assert n == loader.stats()["sequences"] == 200


def test_bucketing_cuts_padding(tok, sft_file):
    kw = dict(max_seq_len=512, batch_size=8)
    bucketed = build_loader("sft", sft_file, tok, **kw).stats()["padding_fraction"]
    padded = build_loader("sft", sft_file, tok, pack=False, **kw).stats()["padding_fraction"]
    assert bucketed < 0.1 < padded


def test_stats_match_the_batches(tok, sft_file):
    loader = build_loader("sft", sft_file, tok, max_seq_len=128, batch_size=8)
    s = loader.stats()
    batches = all_batches(loader)
    useful = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    assert s["tokens"] == useful and s["batches"] == len(batches)
    assert s["padding_fraction"] == pytest.approx(1 - useful / total)


def test_dpo_pairs(tok, dpo_file):
    records = [json.loads(line) for line in open(dpo_file, encoding="utf-8")]
    loader = build_loader("dpo", dpo_file, tok, max_seq_len=64, batch_size=4, drop_last=False)
    n = 0
    for idx, batch in zip(loader.plan(), all_batches(loader)):
        assert batch.pop("pair_index").tolist() == list(idx)  # the record each row came from
        shapes = {v.shape for v in batch.values()}
        assert len(shapes) == 1 and len(batch) == 6
        for side in ("chosen", "rejected"):
            for i, ids, labels in zip(idx, batch[f"{side}_input_ids"], batch[f"{side}_labels"]):
                want, want_labels = independent_labels(tok, records[i][side], 64)
                assert ids[:len(want)].tolist() == want
                assert labels[:len(want)].tolist() == want_labels
        n += len(idx)
    s = loader.stats()
    assert n == s["pairs"] and s["pairs"] + s["no_target_pairs"] == 120


def test_truncation_that_loses_every_target_drops_the_row(tok, tmp_path):
    long_user = {"conversations": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}]}
    ok = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [long_user, ok, ok])
    loader = build_loader("sft", path, tok, max_seq_len=32, batch_size=1)
    assert loader.stats()["no_target_sequences"] == 1 and len(loader) == 2
    for b in loader:
        assert (b["labels"] != -100).any()


# ---- token cache ----

def test_cache_is_reused_and_rebuilt_when_the_file_changes(tok, pretrain_file, tmp_path):
    c1 = load_token_cache(pretrain_file, "pretrain", tok)
    assert c1.folder.parent.name == "pretrain.jsonl.tokcache"
    built = (c1.folder / "meta.json").stat().st_mtime_ns
    c2 = load_token_cache(pretrain_file, "pretrain", tok)
    assert (c2.folder / "meta.json").stat().st_mtime_ns == built  # reused
    with open(pretrain_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    c3 = load_token_cache(pretrain_file, "pretrain", tok)
    assert c3.meta["records"] == 301
    # same size, one byte changed in the middle: the mtime moves, so it is rebuilt
    data = bytearray(open(pretrain_file, "rb").read())
    pos = data.index(b"alpha", len(data) // 2)
    data[pos:pos + 5] = b"gamma"
    open(pretrain_file, "wb").write(bytes(data))
    os.utime(pretrain_file, ns=(1, 1))
    c4 = load_token_cache(pretrain_file, "pretrain", tok)
    assert c4.meta["fingerprint"]["mtime_ns"] == 1 and not np.array_equal(c4.tokens, c3.tokens)
    # a cache folder elsewhere
    c5 = load_token_cache(pretrain_file, "pretrain", tok, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache") in c5.folder.parents and np.array_equal(c5.tokens, c4.tokens)


def test_parallel_build_equals_in_process_build(tok, sft_file, tmp_path):
    a = load_token_cache(sft_file, "sft", tok, cache_dir=tmp_path / "a", num_workers=0)
    b = load_token_cache(sft_file, "sft", tok, cache_dir=tmp_path / "b", num_workers=2)
    assert b.meta["workers"] == 2
    for x, y in ((a.tokens, b.tokens), (a.mask, b.mask), (a.offsets, b.offsets), (a.first_target, b.first_target)):
        np.testing.assert_array_equal(x, y)


def test_parallel_build_streams_blocks(tok, tmp_path, monkeypatch):
    """Many blocks in flight through 2 workers keep file order."""
    import minimind.data.cache as cache
    from minimind.data import jsonl
    monkeypatch.setattr(cache, "iter_line_blocks", lambda p: jsonl.iter_line_blocks(p, max_lines=7))
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts(100)])
    c = load_token_cache(path, "pretrain", tok, num_workers=2)
    want = np.concatenate([[tok.bos_id] + tok.encode(t) + [tok.eos_id] for t in texts(100)])
    np.testing.assert_array_equal(c.tokens, want)


# ---- shuffling, resume, shards ----

def ids_of(batches, key="input_ids"):
    return [b[key].tolist() for b in batches]


def test_shuffle_is_deterministic_per_epoch(tok, sft_file):
    a = build_loader("sft", sft_file, tok, max_seq_len=64, batch_size=4, seed=7)
    b = build_loader("sft", sft_file, tok, max_seq_len=64, batch_size=4, seed=7)
    c = build_loader("sft", sft_file, tok, max_seq_len=64, batch_size=4, seed=8)
    e0 = ids_of(a)
    assert e0 == ids_of(b)
    assert e0 != ids_of(c)
    a.set_epoch(1)
    assert ids_of(a) != e0


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_resume_continues_with_exactly_the_next_batch(tok, pretrain_file, sft_file, kind):
    path = pretrain_file if kind == "pretrain" else sft_file
    kw = dict(max_seq_len=32, batch_size=4, seed=3)
    ref = build_loader(kind, path, tok, **kw)
    want = []
    for epoch in range(2):
        ref.set_epoch(epoch)
        want += ids_of(ref)
    for stop in (0, 5, len(ref) - 1, len(ref), len(ref) + 3):
        run = build_loader(kind, path, tok, **kw)
        got, it = [], iter(run)
        for _ in range(stop if stop < len(run) else len(run)):
            got.append(next(it)["input_ids"].tolist())
        if stop >= len(run):  # finish epoch 0, start epoch 1
            assert next(it, None) is None
            run.set_epoch(1)
            it = iter(run)
            for _ in range(stop - len(run)):
                got.append(next(it)["input_ids"].tolist())
        state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint
        resumed = build_loader(kind, path, tok, **kw)
        resumed.load_state_dict(state)
        for epoch in range(state["epoch"], 2):
            resumed.set_epoch(epoch)
            got += ids_of(resumed)
        assert got == want, f"stopped after {stop}"


def test_ddp_shards_are_disjoint_and_complete(tok, sft_file):
    kw = dict(max_seq_len=64, batch_size=4, seed=5)
    full = ids_of(build_loader("sft", sft_file, tok, **kw))
    for W in (2, 3):
        ranks = [ids_of(build_loader("sft", sft_file, tok, rank=r, world_size=W, **kw)) for r in range(W)]
        assert len({len(r) for r in ranks}) == 1  # lockstep
        assert all(len(build_loader("sft", sft_file, tok, rank=r, world_size=W, **kw)) == len(ranks[r])
                   for r in range(W))
        usable = len(full) - len(full) % W
        for r in range(W):
            assert ranks[r] == full[r:usable:W]  # rank r takes global batches r, r + W, ...


def test_resume_with_another_world_size(tok, sft_file):
    kw = dict(max_seq_len=64, batch_size=2, seed=5)
    full = ids_of(build_loader("sft", sft_file, tok, **kw))
    # two ranks run 6 steps each (12 global batches), then the job resumes on three ranks
    old = [build_loader("sft", sft_file, tok, rank=r, world_size=2, **kw) for r in range(2)]
    its = [iter(l) for l in old]
    consumed = [[next(it)["input_ids"].tolist() for _ in range(6)] for it in its]
    state = old[0].state_dict()
    assert state["position"] == 12 and old[1].state_dict()["position"] == 12
    new = []
    for r in range(3):
        l = build_loader("sft", sft_file, tok, rank=r, world_size=3, **kw)
        l.load_state_dict(state)
        new.append(ids_of(l))
    assert sorted(consumed[0] + consumed[1]) == sorted(full[:12])
    n_new = (len(full) - 12) // 3 * 3
    for r in range(3):
        assert new[r] == full[12 + r:12 + n_new:3]


def test_state_of_another_setting_is_refused(tok, sft_file):
    a = build_loader("sft", sft_file, tok, max_seq_len=64, batch_size=4)
    b = build_loader("sft", sft_file, tok, max_seq_len=64, batch_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(a.state_dict())


# ---- bad input ----

GOOD_SFT = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD = [
    ("sft", '{"conversations": [', "malformed JSON"),
    # the line ends inside the string (a truncated file): json's "Invalid control character at" (the newline)
    ("pretrain", '{"text": "a truncated rec', r"the line ends inside a record \(Invalid control character at column "
                                              r"26\); it looks truncated \("),
    ("pretrain", '{"text": 5 6}', r"malformed JSON: Expecting ',' delimiter at column 12 \("),
    ("sft", {"messages": []}, "missing field 'conversations'"),
    ("sft", {"conversations": "hi"}, "must be a list"),
    ("sft", {"conversations": []}, "empty conversation"),
    ("sft", {"conversations": [{"role": "user", "content": 3}]}, "must be a string"),
    ("sft", {"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "'user' where 'assistant' was expected"),
    ("sft", {"conversations": [{"role": "assistant", "content": "a"}]}, "'assistant' where 'user' was expected"),
    ("sft", {"conversations": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ("pretrain", {"txt": "a"}, "missing field 'text'"),
    ("pretrain", {"text": ["a"]}, "must be a string"),
    ("pretrain", [1, 2], "expected a JSON object"),
    ("dpo", {"chosen": GOOD_SFT["conversations"]}, "missing field 'rejected'"),
    ("dpo", {"chosen": GOOD_SFT["conversations"], "rejected": [{"role": "user"}]}, "has no 'content'"),
]


def good_record(kind):
    if kind == "pretrain":
        return {"text": "fine"}
    if kind == "dpo":
        return {"chosen": GOOD_SFT["conversations"], "rejected": GOOD_SFT["conversations"]}
    return GOOD_SFT


@pytest.mark.parametrize("kind,bad,message", BAD)
def test_bad_record_names_file_and_line(tok, tmp_path, kind, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [good_record(kind), good_record(kind), bad, good_record(kind)])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        build_loader(kind, path, tok, max_seq_len=32, batch_size=1)
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        loader = build_loader(kind, path, tok, max_seq_len=32, batch_size=1, skip_bad_records=True, pack=False)
    assert loader.stats()["skipped_records"] == 1 and len(loader) == 3
    # the cache now knows about the bad record: without the flag it still refuses
    with pytest.raises(DataError, match="bad.jsonl:3:"):
        build_loader(kind, path, tok, max_seq_len=32, batch_size=1)


def test_the_cache_command_names_a_bad_record_in_one_line(tmp_path):
    """python -m minimind.data: FILE:LINE and what is wrong, exit 2; no traceback, no usage block."""
    from tests.train_helpers import run_module
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, '{"text": "cut off'])
    r = run_module(["-m", "minimind.data", "--kind", "pretrain", "--data", str(path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "usage:" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"python -m minimind.data: error: {path}:2: malformed JSON: the line ends inside a "
                               f"record (Invalid control character at column 18); it looks truncated")


def test_invalid_utf8_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bin.jsonl:3: invalid UTF-8"):
        build_loader("pretrain", path, tok, max_seq_len=8, batch_size=1)


def test_blank_lines_are_not_records(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n', encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = build_loader("pretrain", path, tok, max_seq_len=4, batch_size=1, pack=False)
    assert loader.stats()["records"] == 2


def test_bad_arguments(tok, pretrain_file):
    with pytest.raises(ValueError, match="unknown data kind"):
        build_loader("rlhf", pretrain_file, tok, max_seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="rank 2"):
        build_loader("pretrain", pretrain_file, tok, max_seq_len=8, batch_size=1, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_loader("pretrain", pretrain_file.parent / "nope.jsonl", tok, max_seq_len=8, batch_size=1)


def test_cache_build_streams_the_file(tok, tmp_path, monkeypatch):
    """Python-side memory while building stays at a few blocks, far below the file size."""
    import tracemalloc

    import minimind.data.cache as cache
    from minimind.data import jsonl
    monkeypatch.setattr(cache, "iter_line_blocks", lambda p: jsonl.iter_line_blocks(p, max_bytes=4 << 10))
    monkeypatch.setattr(cache, "FINGERPRINT_BYTES", 4 << 10)  # (1 MiB at each end in real use)
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in texts(4000, seed=9)])
    size = path.stat().st_size
    tracemalloc.start()
    c = load_token_cache(path, "pretrain", tok, num_workers=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert c.meta["records"] == 4000 and size > 500_000
    assert peak < size / 4, (peak, size)


def test_a_byte_order_mark_is_not_a_bad_record(tok, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first line"}\n{"text": "second"}\n')
    cache = load_token_cache(path, "pretrain", tok, cache_dir=tmp_path / "c")
    assert len(cache) == 2 and tok.decode(cache.tokens[cache.offsets[0]:cache.offsets[1]].tolist()).startswith(
        "<|im_start|>first line")
