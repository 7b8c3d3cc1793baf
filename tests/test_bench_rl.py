"""bench.rl at a tiny size on the CPU: its memory accounting on known allocations, the same loss both ways, and the
log-prob part of MiniMind's step holding the (rows, L, vocab) log-softmaxes that ours never holds whole. Nothing
here asserts a speed."""
import json

import pytest
import torch

from bench import rl as bench_rl
from tests.train_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cpu_peak_counts_allocations_and_frees():
    def work():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(2 << 20)  # 8 MiB: 12 live
        del a
        c = torch.ones(1 << 20)  # 4 MiB: 12 live again, not 16
        return b, c
    assert bench_rl.cpu_peak_bytes(work) == pytest.approx(12 << 20, rel=0.01)


def test_bench_rl_tiny(tmp_path, monkeypatch):
    """At 6 rows x 48 tokens the (N, L, V) fp32 logits are 7 MiB: with ours' chunks capped at 1 MiB of logits, its
    log-prob part stays far below MiniMind's, which holds every row's log-softmax for the backward."""
    from kernels import linear_cross_entropy
    monkeypatch.setattr(linear_cross_entropy, "MAX_CHUNK_LOGITS_BYTES", 1 << 20)
    out = tmp_path / "rl.json"
    results = bench_rl.main(["--preset", "tiny", "--prompt_len", "8", "--gen_len", "48", "--repeats", "1",
                             "--json", str(out)])
    ours, theirs = results["ours"], results["minimind"]
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    doc = json.loads(out.read_text())
    logits_mib = 6 * 48 * 6400 * 4 / 2 ** 20
    assert doc["logprob_part"]["minimind"]["peak_MiB"] > logits_mib
    # ours: a 1 MiB chunk and the tied head's two 1.6 MiB weight gradients (the parameter's, the fp32 accumulator)
    assert doc["logprob_part"]["ours"]["peak_MiB"] < logits_mib * 0.7
    assert doc["logprob_part_peak_ratio"] > 2.5 and doc["rollout_tokens_per_s"] > 0
    assert doc["memory_measured_by"] == "torch.profiler CPU allocator events"

