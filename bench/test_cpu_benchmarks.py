"""CPU benchmarks as pytest-benchmark tests: the data pipeline on the bundled demo data, and the modelled step.

    python -m pytest bench/test_cpu_benchmarks.py --benchmark-only --benchmark-json=FILE

Same measurements as `python -m bench.data` (which reports them as a table) on a smaller demo corpus, plus the
time to count one training step (bench/launches.py) with its modelled RTX 3090 step in extra_info.
"""
import json

import pytest

PRETRAIN_RECORDS, SFT_RECORDS = 6000, 2000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    paths = write_demo_data(tmp_path_factory.mktemp("bench_demo"), {"pretrain": PRETRAIN_RECORDS, "sft": SFT_RECORDS})
    return paths, load_tokenizer()


def test_tokenize(benchmark, demo):
    paths, tok = demo
    texts = [json.loads(line)["text"] for line in open(paths["pretrain"], encoding="utf-8")]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokens = benchmark(lambda: sum(len(ids) for ids in tok.encode_batch(texts)))
    benchmark.extra_info.update(mb=mb, tokens=tokens, tokenize_mb_s=mb / benchmark.stats.stats.median)


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_cache_build(benchmark, demo, tmp_path, kind):
    """Parse + validate + tokenise + write the token cache of the demo file, in-process, from scratch each round."""
    from minimind.data import load_token_cache
    paths, tok = demo
    rounds = iter(range(1000))

    def build():
        return load_token_cache(paths[kind], kind, tok, cache_dir=tmp_path / f"r{next(rounds)}", num_workers=0)
    cache = benchmark.pedantic(build, rounds=3, iterations=1)
    mb = paths[kind].stat().st_size / 1e6
    benchmark.extra_info.update(mb=mb, tokens=cache.meta["tokens"], cache_build_mb_s=mb / benchmark.stats.stats.median)


@pytest.mark.parametrize("kind,pack", [("pretrain", True), ("pretrain", False), ("sft", True), ("sft", False)])
def test_loader(benchmark, demo, tmp_path, kind, pack):
    """One epoch of batches of 32 rows of <= 512 tokens from the cache, as int64 tensors."""
    from minimind.data import build_loader
    paths, tok = demo
    loader = build_loader(kind, paths[kind], tok, max_seq_len=512, batch_size=32, pack=pack, cache_dir=tmp_path)

    def epoch():
        return sum(v.numel() for b in loader for k, v in b.items() if k.endswith("input_ids"))
    tokens = benchmark(epoch)
    benchmark.extra_info.update(tokens=tokens, loader_tokens_s=tokens / benchmark.stats.stats.median,
                                padding_fraction=loader.stats()["padding_fraction"])


@pytest.mark.parametrize("variant", ["triton", "minimind2"])
def test_model_count(benchmark, variant):
    """Counting one MiniMind2-Small training step on fake tensors (bench/launches.py), and what it models."""
    pytest.importorskip("triton")
    from bench import launches, roofline
    from kernels import get_backend
    if variant == "triton":
        get_backend("triton")
    g = roofline.gpu("RTX 3090")
    step = benchmark.pedantic(launches.count_step, args=("small", variant), kwargs={"sms": g.sms}, rounds=2,
                              iterations=1)
    p = roofline.project(step, g)
    benchmark.extra_info.update(launches=p["launches"], gb_moved=step.totals()["bytes"] / 1e9,
                                modelled_3090_step_ms=p["step_ms"], label=roofline.LABEL)
