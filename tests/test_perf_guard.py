"""CI guard on what the kernels cost a GPU, counted on the CPU (bench/launches.py, no kernel runs):

- a memory-bound op (bench.launches.GUARDED_OPS) moves at most 1.1 x its minimum traffic at MiniMind shapes and
  dtypes, forward + backward, Triton kernels (their files' traffic formulas, tests/test_traffic.py) and the ATen
  ops inside the op together;
- the fused linear cross-entropy never allocates a tensor the size of the full logits;
- the triton backend's launches per training step stay within today's count plus a stated slack.
"""
import pytest
import torch

pytest.importorskip("triton")
from bench import launches  # noqa: E402
from kernels import get_backend  # noqa: E402

LIMIT = 1.1
# dtypes as the engine trains: sublayer outputs in the autocast dtype, the residual stream in float32
DTYPES = {"bf16 autocast": (torch.bfloat16, torch.float32), "fp16 autocast": (torch.float16, torch.float32),
          "fp32": (torch.float32, torch.float32)}
HIDDEN = (512, 768, 640)  # MiniMind2-Small, MiniMind2, MiniMind2-MoE
SMS = 132  # the most SMs of the modelled GPUs (H100 / H200): the largest per-program partial sums


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    get_backend("triton")  # built before bench.launches hides the interpreter flag


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("op", list(launches.GUARDED_OPS))
def test_memory_bound_op_moves_at_most_1_1x_its_minimum(op, dtypes):
    act, stream = DTYPES[dtypes]
    for hidden in HIDDEN:
        count = launches.count_guarded_op(op, launches.Shapes(hidden, act=act, stream=stream), sms=SMS)
        assert all(l.traffic in ("formula", "sizes") for l in count.launches), count.launches
        minimum = count.minimum_forward + count.minimum_backward
        assert count.ratio <= LIMIT, (f"{op} at hidden {hidden} ({dtypes}) moves {count.ratio:.3f} x its minimum "
                                      f"({count.bytes() / 1e6:.0f} MB against {minimum / 1e6:.0f} MB): "
                                      + "; ".join(f"{l.name} {l.phase} {l.op} {l.bytes / 1e6:.1f} MB"
                                                  for l in count.launches))


def test_minimum_of_an_op_by_hand():
    """swiglu at N x I: forward reads g, u and writes y; backward reads dy, g, u and writes dg, du (bf16)."""
    s = launches.Shapes(512)
    count = launches.count_guarded_op("swiglu", s, sms=SMS)
    n = s.tokens * s.inter * 2
    assert (count.minimum_forward, count.minimum_backward) == (3 * n, 5 * n)
    assert [l.name for l in count.launches if l.op == "swiglu"] == ["_swiglu_fwd_kernel", "_swiglu_bwd_kernel"]


def _largest_allocation(backend, name, hidden, vocab=6400, tokens=32 * 512):
    """Bytes of the largest tensor the op allocates on the model's call (float32 hidden states and tied weight,
    under bf16 autocast), forward and backward."""
    def inputs():
        labels = torch.zeros(tokens, dtype=torch.long)
        return [torch.empty(tokens, hidden, requires_grad=True), torch.empty(vocab, hidden, requires_grad=True),
                labels]
    count = launches.count_op(name, inputs, backend=backend, autocast=torch.bfloat16)
    return max(n for n, _ in count.allocations)


@pytest.mark.parametrize("name", ["linear_cross_entropy", "linear_logprobs"])
def test_fused_linear_cross_entropy_never_allocates_full_logits(name):
    logits = 32 * 512 * 6400 * 2  # bytes of MiniMind2's full logits in bf16
    for hidden in (512, 768):
        largest = _largest_allocation("triton", name, hidden)
        assert largest < logits / 2, f"{name}: a {largest / 1e6:.0f} MB tensor (the full logits: {logits / 1e6:.0f} MB)"
    assert _largest_allocation("torch", name, 512) >= logits  # the reference's logits are seen: the check can fail


# Launches per training step of the triton backend at 32 x 512 tokens on an RTX 3090's 82 SMs, counted on
# 2026-11-30 (torch 2.13, triton 3.9). A change may add at most SLACK launches; update these after an intended one.
TODAY = {"small": 628, "base": 1152, "moe": 1253, "minimind3": 649, "minimind3-moe": 979}
SLACK = 10  # less than one more kernel per layer, forward and backward, in the 8-layer models


@pytest.mark.parametrize("preset", list(TODAY))
def test_triton_launches_per_step_do_not_grow(preset):
    step = launches.count_step(preset, "triton", sms=82)
    totals = step.totals()
    assert totals["launches"] <= TODAY[preset] + SLACK, (
        f"{preset}: {totals['launches']} launches per step, today {TODAY[preset]} (+{SLACK} allowed); by op: "
        + ", ".join(f"{op} {t['launches']}" for op, t in sorted(step.by("op").items())))
    assert totals["syncs"] == 0  # the GPU path has no host sync at all (device-side asserts)
