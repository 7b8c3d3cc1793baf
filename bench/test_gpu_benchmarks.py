"""GPU benchmarks as pytest-benchmark tests (skipped without CUDA): each hot op forward + backward at MiniMind2
shapes on the torch reference and our Triton kernels, and one training step per preset and variant.

    python -m pytest bench/test_gpu_benchmarks.py --benchmark-only --benchmark-json=FILE

The shapes, inputs and variants are bench/kernels.py's and bench/throughput.py's (the same code the suite's
tables come from); every round ends with torch.cuda.synchronize(), so a round is the GPU's time for the call.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")

OPS = ("rms_norm", "add_rms_norm", "rope", "qk_norm_rope", "swiglu", "linear_cross_entropy", "moe")


def _case(op):
    from bench import kernels
    return next(c for c in kernels.build_cases(kernels.Sizes(), torch.bfloat16, (op,))
                if c.hidden in (None, 512))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_op_forward_backward(benchmark, op, backend):
    from bench import kernels
    case, fn = _case(op), kernels.variant_fn(op, backend)
    args = case.make(torch.device("cuda"), torch.bfloat16)
    for i in case.grad_args:
        args[i].requires_grad_(True)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(*args)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for i in case.grad_args:
            args[i].grad = None
        torch.cuda.synchronize()
    benchmark.pedantic(fwd_bwd, warmup_rounds=2, rounds=10, iterations=1)
    benchmark.extra_info.update(shape=case.shape, bytes_fwdbwd=case.bytes_fwdbwd, flops_fwdbwd=case.flops_fwdbwd)


@pytest.mark.parametrize("variant", ["minimind2", "triton"])
@pytest.mark.parametrize("preset", ["small", "moe", "minimind3"])
def test_training_step(benchmark, preset, variant):
    from bench import throughput
    from minimind.config import MiniMindConfig
    cfg, v = MiniMindConfig.from_preset(preset), throughput.VARIANTS[variant]
    step = throughput.TrainStep(cfg, v, torch.device("cuda"))
    batch, useful = throughput.make_batch(cfg, 32, 512, v.padded, 0.5)
    batch = {k: t.cuda() for k, t in batch.items()}

    def one_step():
        step(batch)
        torch.cuda.synchronize()
    benchmark.pedantic(one_step, warmup_rounds=2, rounds=5, iterations=1)
    benchmark.extra_info.update(useful_tokens=useful, useful_tokens_per_s=useful / benchmark.stats.stats.median)
