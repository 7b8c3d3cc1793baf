"""Every Triton kernel's traffic formula (the `traffic` / `flops` functions at the end of its kernel file, which
bench/launches.py uses to count a training step's bytes) against what its tl.load / tl.store really touch.

The ops run forward and backward under Triton's interpreter at several small, awkward shapes; a recorder wraps the
interpreter's masked load and store and keeps every masked-in address, and each launch's addresses are attributed
to its tensor arguments by address range. The formula must give, per argument, exactly the distinct bytes read and
the distinct bytes written (arguments passed twice, as a placeholder for an unused pointer, are compared together).
"""
import contextlib
import importlib
import inspect
from unittest import mock

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")
if torch.cuda.is_available():
    pytest.skip("the traffic recorder wraps Triton's interpreter (CPU only)", allow_module_level=True)

from kernels import linear_cross_entropy as lce  # noqa: E402
from kernels import moe, qk_norm_rope, rms_norm, rope, swiglu  # noqa: E402
from minimind.model import rope_tables  # noqa: E402


class Recorder:
    """Launches of the interpreter with, per launch, the distinct addresses loaded and stored."""

    def __init__(self):
        self.launches, self._loads, self._stores = [], None, None

    @contextlib.contextmanager
    def active(self):
        builder = interpreter.InterpreterBuilder
        load, store, run = builder.create_masked_load, builder.create_masked_store, interpreter.InterpretedFunction.run
        recorder = self

        def masked_load(self, ptrs, mask, other, *args):
            recorder._note(recorder._loads, ptrs, mask)
            return load(self, ptrs, mask, other, *args)

        def masked_store(self, ptrs, value, mask, *args):
            recorder._note(recorder._stores, ptrs, mask)
            return store(self, ptrs, value, mask, *args)

        def launch(self, *args, grid, warmup, **kwargs):
            bound = inspect.signature(self.fn).bind_partial(
                *args, **{k: v for k, v in kwargs.items() if k in inspect.signature(self.fn).parameters})
            bound.apply_defaults()
            recorder._loads, recorder._stores = {}, {}
            out = run(self, *args, grid=grid, warmup=warmup, **kwargs)
            named = dict(bound.arguments)
            recorder.launches.append((self, tuple(grid(named) if callable(grid) else grid), named,
                                      recorder._loads, recorder._stores))
            return out

        with mock.patch.object(builder, "create_masked_load", masked_load), \
                mock.patch.object(builder, "create_masked_store", masked_store), \
                mock.patch.object(interpreter.InterpretedFunction, "run", launch):
            yield self

    @staticmethod
    def _note(table, ptrs, mask):
        if table is None:
            return
        addresses = np.asarray(ptrs.data)
        taken = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        table.setdefault(size, []).append(taken.astype(np.uint64).ravel())


def _groups(args):
    """Tensor arguments grouped by the elements they cover: {(data_ptr, shape, strides, element size): (names,
    sorted addresses of their elements)}; the same tensor passed twice is one group."""
    groups = {}
    for name, t in args.items():
        if torch.is_tensor(t) and t.numel():
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.element_size())
            if key not in groups:
                offsets = np.zeros((), dtype=np.int64)
                for size, stride in zip(t.shape, t.stride()):
                    offsets = offsets[..., None] + np.arange(size, dtype=np.int64) * stride
                groups[key] = ([], np.unique(t.data_ptr() + offsets.ravel() * t.element_size()).astype(np.uint64))
            groups[key][0].append(name)
    return groups


def _distinct_bytes(table, groups, kernel):
    """{group key: distinct bytes of the recorded addresses among its elements}; every address must belong to one."""
    out = {}
    for size, chunks in table.items():
        addresses = np.unique(np.concatenate(chunks))
        attributed = np.zeros(len(addresses), dtype=bool)
        for key, (_, elements) in groups.items():
            inside = np.isin(addresses, elements)
            attributed |= inside
            out[key] = out.get(key, 0) + int(inside.sum()) * size
        assert attributed.all(), f"{kernel}: addresses outside every tensor argument"
    return out


def check_traffic(recorder):
    """Every recorded launch: the kernel file's formula equals the bytes the interpreter's loads / stores touched."""
    assert recorder.launches, "no Triton launch was recorded"
    for kernel, grid, args, loads, stores in recorder.launches:
        name = kernel.fn.__name__
        formula = importlib.import_module(kernel.fn.__module__).traffic(name, grid, args)
        assert formula is not None, f"{name} has no traffic formula"
        groups = _groups(args)
        read, written = _distinct_bytes(loads, groups, name), _distinct_bytes(stores, groups, name)
        for key, (names, _) in groups.items():
            expected = (sum(formula.get(n, (0, 0))[0] for n in names), sum(formula.get(n, (0, 0))[1] for n in names))
            touched = (read.get(key, 0), written.get(key, 0))
            assert touched == expected, \
                f"{name} grid {grid} {'/'.join(names)}: touched (read, written) {touched}, formula {expected}"


def _grads_of(outputs):
    outputs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    g = torch.Generator().manual_seed(1)
    torch.autograd.backward(outputs, [torch.randn(o.shape, generator=g).to(o.dtype) for o in outputs])


def _leaf(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).requires_grad_()


@pytest.mark.parametrize("rows,hidden,x_dtype,r_dtype", [(1, 64, torch.float32, None), (7, 123, torch.bfloat16, None),
                                                         (9, 96, torch.bfloat16, torch.float32),
                                                         (5, 64, torch.float32, torch.float32),
                                                         (3, 80, torch.bfloat16, torch.float16)])
def test_rms_norm_traffic(rows, hidden, x_dtype, r_dtype):
    x, w = _leaf((rows, hidden), x_dtype, 0), _leaf((hidden,), torch.float32, 1)
    with Recorder().active() as rec:
        if r_dtype is None:
            _grads_of(rms_norm.rms_norm(x, w))
        else:
            _grads_of(rms_norm.add_rms_norm(x, _leaf((rows, hidden), r_dtype, 2), w))
    check_traffic(rec)
    assert {k.fn.__name__ for k, *_ in rec.launches} == {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"}


@pytest.mark.parametrize("op", ["rope", "qk_norm_rope"])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,offset,strided", [(2, 5, 4, 2, 16, 0, False), (1, 3, 8, 2, 10, 4, False),
                                                         (1, 2, 6, 3, 24, 1, False), (3, 4, 2, 2, 8, 0, True)])
def test_rope_traffic(op, B, T, Hq, Hkv, D, offset, strided):
    cos, sin = rope_tables(D, offset + T + 3)
    if strided:  # q, k as views of one projection, as a fused qkv layout would give
        qk = _leaf((B, T, Hq + Hkv, D), torch.bfloat16, 3)
        q, k = qk[:, :, :Hq], qk[:, :, Hq:]
    else:
        q, k = _leaf((B, T, Hq, D), torch.bfloat16, 3), _leaf((B, T, Hkv, D), torch.float32, 4)
    with Recorder().active() as rec:
        if op == "rope":
            _grads_of(rope.rope(q, k, cos, sin, offset))
        else:  # the norm weights in two dtypes
            qw, kw = _leaf((D,), torch.float32, 5), _leaf((D,), torch.bfloat16, 6)
            _grads_of(qk_norm_rope.qk_norm_rope(q, k, qw, kw, cos, sin, offset))
    check_traffic(rec)
    assert len(rec.launches) == 2


@pytest.mark.parametrize("n,dtype", [(10, torch.float32), (5000, torch.bfloat16)])
def test_swiglu_traffic(n, dtype):
    with Recorder().active() as rec:
        _grads_of(swiglu.swiglu(_leaf((n,), dtype, 5), _leaf((n,), dtype, 6)))
    check_traffic(rec)


@pytest.mark.parametrize("reduction", ["mean", "none", "logprobs"])
def test_linear_cross_entropy_traffic(reduction, monkeypatch):
    N, H, V = 37, 16, 300
    monkeypatch.setattr(lce, "MAX_CHUNK_LOGITS_BYTES", 12 * V * 4)  # 4 chunks of <= 12 rows: a short last one
    hidden, weight = _leaf((N, H), torch.float32, 7), _leaf((V, H), torch.float32, 8)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(9))
    labels[::5] = -100
    with Recorder().active() as rec:
        if reduction == "logprobs":
            out = lce.linear_logprobs(hidden, weight, labels)
        else:
            out = lce.linear_cross_entropy(hidden, weight, labels, reduction=reduction)
        _grads_of(out)
    check_traffic(rec)
    assert len(rec.launches) >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_traffic_and_flops(dtype):
    N, H, I, E, K = 19, 32, 48, 4, 2
    g = torch.Generator().manual_seed(10)
    topk_idx = torch.randint(0, E - 1, (N, K), generator=g)  # expert E-1 gets no token
    topk_weight = torch.rand(N, K, generator=g).requires_grad_()
    x = _leaf((N, H), dtype, 11)
    w = [_leaf(shape, dtype, 12 + i) for i, shape in enumerate([(E, I, H), (E, I, H), (E, H, I)])]
    with Recorder().active() as rec:
        _grads_of(moe.moe_experts(x, topk_idx, topk_weight, *w))
    check_traffic(rec)
    names = {k.fn.__name__ for k, *_ in rec.launches}
    assert names == {"_gate_up_kernel", "_rows_to_slots_kernel", "_weight_grad_kernel", "_combine_kernel"}
    M = N * K
    gemm = {k.fn.__name__: moe.flops(k.fn.__name__, grid, args) for k, grid, args, _, _ in rec.launches}
    assert gemm["_weight_grad_kernel"] == 2 * M * H * I and gemm["_combine_kernel"] == 0
    total = sum(moe.flops(k.fn.__name__, grid, args) for k, grid, args, _, _ in rec.launches)
    # forward 6 M H I (gate, up, down); backward 16 M H I: gate and up recomputed (4), dout Wd (2), dx (4) and the
    # three weight gradients (6)
    assert total == 22 * M * H * I
