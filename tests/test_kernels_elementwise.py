"""Numerical parity of the Triton rms_norm, add_rms_norm, rope, qk_norm_rope and swiglu kernels with
kernels/reference.py: forward and every gradient, fp32 / bf16 / fp16, MiniMind2 and awkward shapes.

The reference always runs in float32 on the (upcast) same input values, so low-precision results are compared with
the exact answer, never with themselves. Every torch.empty / torch.empty_like made during a test is filled with NaN
(the autouse fixture below), so an output element a kernel fails to write shows up as NaN and fails the test.
Under the interpreter (no CUDA) the shapes are small; on a GPU the same tests run compiled on larger ones.
"""
import pytest
import torch

from kernels import reference as ref

triton = pytest.importorskip("triton")
from kernels.qk_norm_rope import qk_norm_rope  # noqa: E402
from kernels.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from kernels.rope import rope  # noqa: E402
from kernels.swiglu import _swiglu_fwd_kernel, swiglu  # noqa: E402
from minimind.model import rope_tables  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# fp32: only the summation order differs from the reference (row sums of up to a few thousand terms).
# bf16 / fp16: the result is rounded to 8 / 11 mantissa bits (relative 4e-3 / 5e-4) and h is rounded before the norm.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ROWS = (1, 7, 4096) if CUDA else (1, 7, 130)  # one row, rows not a multiple of anything, MiniMind-like on a GPU
HIDDEN = (512, 640, 768, 123)


GUARD = 1024  # NaN elements behind every new float buffer of a test


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every new float tensor from torch.empty / torch.empty_like starts as NaN, at the front of a longer NaN buffer:
    an element a kernel fails to write stays NaN (assert_close fails on it), and a write past the end of an output
    (a launch that covers more heads or rows than the tensor has) changes the guard behind it, checked at the end."""
    empty, empty_like = torch.empty, torch.empty_like
    guards = []

    def poison(t):
        if not t.is_floating_point():
            return t
        if not t.is_contiguous():
            return t.fill_(float("nan"))
        buf = empty(t.numel() + GUARD, dtype=t.dtype, device=t.device).fill_(float("nan"))
        guards.append(buf[t.numel():])
        return buf[:t.numel()].view(t.shape).requires_grad_(t.requires_grad)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    yield
    assert all(torch.isnan(g).all() for g in guards), "a kernel wrote past the end of an output"


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(shape, g, dtype=torch.float32, requires_grad=True, scale=1.0):
    return (scale * torch.randn(shape, generator=g, device=DEVICE)).to(dtype).requires_grad_(requires_grad)


def upcast(t):
    """A float32 leaf with t's values, for the reference."""
    return t.detach().float().requires_grad_(t.requires_grad)


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected|, and no NaN anywhere (unwritten outputs are NaN)."""
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in output (an element was not written?)"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def test_poisoning_catches_an_unwritten_element():
    """The harness itself: a launch that covers one element less leaves a NaN, and assert_close fails on it."""
    g, u = torch.ones(300, device=DEVICE), torch.ones(300, device=DEVICE)
    y = torch.empty_like(g)
    _swiglu_fwd_kernel[(1,)](g, u, y, 299, BLOCK=512)
    assert torch.isnan(y[299]) and not torch.isnan(y[:299]).any()
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(y, ref.swiglu(g, u), 1e-5, "y")


# ---------------------------------------------------------------------------------------------------------- RMSNorm

ROW_SCALES = (1.0, 1e-2, 1e-3)


def row_scales(rows):
    """(rows, 1): rows scaled by 1, 1e-2, 1e-3 in turn. At mean(x^2) ~ 1e-6 the eps (1e-5) dominates the norm, so
    where a kernel adds it shows (at unit scale it changes the result by 1e-5)."""
    return torch.tensor(ROW_SCALES, device=DEVICE).repeat(rows)[:rows, None]


def assert_close_by_scale(actual, expected, tol, what):
    """assert_close on each group of rows of one scale (rows i, i + 3, ...): a 1e-3 row's gradient is ~300x a unit
    row's, so one relative tolerance over all rows would hide errors in the unit rows."""
    for i, scale in enumerate(ROW_SCALES[:actual.shape[0]]):
        assert_close(actual[i::len(ROW_SCALES)], expected[i::len(ROW_SCALES)], tol, f"{what} (rows at {scale:g})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, H, dtype):
    g = gen(1000 * rows + H)
    x, w = randn((rows, H), g, dtype, scale=row_scales(rows)), randn((H,), g)
    dy = randn((rows, H), g, dtype, requires_grad=False)
    y = rms_norm(x, w, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = upcast(x), upcast(w)
    y32 = ref.rms_norm(x32, w32, 1e-5)
    dx32, dw32 = torch.autograd.grad(y32, (x32, w32), dy.float())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert_close_by_scale(y, y32, TOL[dtype], "y")
    assert_close_by_scale(dx, dx32, TOL[dtype], "dx")
    assert_close(dw, dw32, TOL[dtype], "dw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", (640, 123))
def test_add_rms_norm(H, dtype):
    rows = ROWS[-1]
    g = gen(H + 7)
    x, r = (randn((rows, H), g, dtype, scale=row_scales(rows)) for _ in range(2))
    w = randn((H,), g)
    dh, dy = randn((rows, H), g, dtype, requires_grad=False), randn((rows, H), g, dtype, requires_grad=False)
    h, y = add_rms_norm(x, r, w, 1e-6)
    dx, dr, dw = torch.autograd.grad((h, y), (x, r, w), (dh, dy))
    x32, r32, w32 = upcast(x), upcast(r), upcast(w)
    h32, y32 = ref.add_rms_norm(x32, r32, w32, 1e-6)
    dx32, dr32, dw32 = torch.autograd.grad((h32, y32), (x32, r32, w32), (dh.float(), dy.float()))
    assert h.dtype == y.dtype == dx.dtype == dr.dtype == dtype
    assert_close_by_scale(h, h32, TOL[dtype], "h")
    assert_close_by_scale(y, y32, TOL[dtype], "y")
    assert_close_by_scale(dx, dx32, TOL[dtype], "dx")
    assert_close_by_scale(dr, dr32, TOL[dtype], "dresidual")
    assert_close(dw, dw32, TOL[dtype], "dw")


# (x, residual) dtypes that differ: under autocast x (a sublayer output) is bf16 / fp16 and the residual stream fp32;
# the reverse order; and two low-precision dtypes, which promote to fp32 so that neither gradient is h's dtype
MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
         (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("use_h", (True, False), ids=("h used", "h unused"))
@pytest.mark.parametrize("H", (512, 123))
@pytest.mark.parametrize("x_dtype,r_dtype", MIXED, ids=str)
def test_add_rms_norm_mixed_dtypes(x_dtype, r_dtype, H, use_h):
    """h and y come out in the promoted dtype (as MiniMind2's `residual + attn_out`); the one backward kernel
    stores x's gradient in x's dtype and the residual's in the residual's, each the same float32 gradient rounded
    once. Every output is compared with the float32 reference at its own dtype's tolerance. With h unused (the
    final norm) the kernel gets no incoming gradient of h."""
    rows = ROWS[-1]
    g = gen(H + 13)
    x, r, w = randn((rows, H), g, x_dtype), randn((rows, H), g, r_dtype), randn((H,), g)
    out_dtype = torch.promote_types(x_dtype, r_dtype)
    dh, dy = randn((rows, H), g, out_dtype, False), randn((rows, H), g, out_dtype, False)
    h, y = add_rms_norm(x, r, w)
    outs, grads = ((h, y), (dh, dy)) if use_h else ((y,), (dy,))
    dx, dr, dw = torch.autograd.grad(outs, (x, r, w), grads)
    x32, r32, w32 = upcast(x), upcast(r), upcast(w)
    h32, y32 = ref.add_rms_norm(x32, r32, w32)
    outs32 = (h32, y32) if use_h else (y32,)
    dx32, dr32, dw32 = torch.autograd.grad(outs32, (x32, r32, w32), [t.float() for t in grads])
    assert h.dtype == y.dtype == out_dtype and dx.dtype == x_dtype and dr.dtype == r_dtype
    assert dw.dtype == torch.float32
    for name, a, b in (("h", h, h32), ("y", y, y32), ("dx", dx, dx32), ("dr", dr, dr32), ("dw", dw, dw32)):
        assert_close(a, b, TOL[a.dtype], name)
    if torch.float32 in (x_dtype, r_dtype):
        # one float32 gradient, stored as it is and rounded once: within one ulp, element by element (a GPU rounds
        # to nearest, the interpreter truncates)
        full, rounded = (dx, dr) if x_dtype == torch.float32 else (dr, dx)
        ulp = torch.finfo(rounded.dtype)
        assert ((rounded.float() - full).abs() <= ulp.eps * (full.abs() + ulp.smallest_normal)).all(), \
            "dx and dr are not the same gradient"


def test_add_rms_norm_h_unused_and_leaf_grads_accumulate():
    """Only y used (the final norm): dh is None inside. Then two backward passes into leaves: x.grad and
    residual.grad double and stay separate tensors although the kernel returns one gradient for both."""
    g = gen(3)
    x, r, w = randn((2, 5, 640), g), randn((2, 5, 640), g), randn((640,), g)
    dy = randn((2, 5, 640), g, requires_grad=False)
    for _ in range(2):
        _, y = add_rms_norm(x, r, w)
        y.backward(dy)
    x32, r32, w32 = upcast(x), upcast(r), upcast(w)
    _, y32 = ref.add_rms_norm(x32, r32, w32)
    y32.backward(2 * dy)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    for name, a, b in (("x", x, x32), ("residual", r, r32), ("weight", w, w32)):
        assert_close(a.grad, b.grad, TOL[torch.float32], f"d{name}")


def test_rms_norm_leading_dims_non_contiguous_and_low_precision_weight():
    g = gen(4)
    base = randn((3, 768, 6), g, torch.bfloat16)
    x = base.transpose(1, 2)  # (3, 6, 768), non-contiguous
    w = randn((768,), g, torch.bfloat16)
    dy = randn((3, 6, 768), g, torch.bfloat16, requires_grad=False)
    y = rms_norm(x, w, 1e-5)
    dbase, dw = torch.autograd.grad(y, (base, w), dy)
    b32, w32 = upcast(base), upcast(w)
    y32 = ref.rms_norm(b32.transpose(1, 2), w32, 1e-5)
    db32, dw32 = torch.autograd.grad(y32, (b32, w32), dy.float())
    assert dw.dtype == torch.bfloat16
    assert_close(y, y32, TOL[torch.bfloat16], "y")
    assert_close(dbase, db32, TOL[torch.bfloat16], "dx")
    assert_close(dw, dw32, TOL[torch.bfloat16], "dw")


def test_rms_norm_weight_grad_is_deterministic_and_empty_input_works():
    g = gen(5)
    x, w = randn((ROWS[-1], 512), g, torch.bfloat16), randn((512,), g)
    dy = randn((ROWS[-1], 512), g, torch.bfloat16, requires_grad=False)
    dws = [torch.autograd.grad(rms_norm(x, w), w, dy)[0] for _ in range(2)]
    assert torch.equal(dws[0], dws[1])
    e = torch.zeros(0, 512, device=DEVICE, requires_grad=True)
    y = rms_norm(e, w)
    assert y.shape == (0, 512)
    assert torch.equal(torch.autograd.grad(y.sum(), w)[0], torch.zeros_like(w))


def test_rms_norm_bad_input_names_the_file():
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="kernels/rms_norm.py.*weight"):
        rms_norm(x, torch.ones(63, device=DEVICE))
    with pytest.raises(ValueError, match="kernels/rms_norm.py.*residual"):
        add_rms_norm(x, x[:, :32], torch.ones(64, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------- RoPE

ROPE_SHAPES = [  # (B, T, Hq, Hkv, D, offset)
    (2, 5, 8, 2, 64, 0),
    (1, 3, 8, 2, 80, 7),    # head dim 80: half 40 is not a power of two; offset as in cached decoding
    (2, 4, 8, 2, 96, 1),
    (1, 1, 4, 4, 128, 30),  # one token, as many kv heads as q heads
    (2, 3, 6, 3, 64, 2),    # head counts that are not powers of two: 3 and 5 kv heads
    (1, 4, 10, 5, 32, 0),
] + ([(8, 512, 8, 2, 64, 0), (4, 256, 8, 2, 80, 100)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,offset", ROPE_SHAPES)
def test_rope(B, T, Hq, Hkv, D, offset, dtype):
    g = gen(B * 1000 + T * 10 + D)
    q, k = randn((B, T, Hq, D), g, dtype), randn((B, T, Hkv, D), g, dtype)
    dq, dk = randn((B, T, Hq, D), g, dtype, requires_grad=False), randn((B, T, Hkv, D), g, dtype, requires_grad=False)
    # MiniMind's tables repeat each half of a row; perturbed here so the two halves differ and a kernel that read
    # one half for both would fail
    cos, sin = (t.to(DEVICE) + 0.1 * torch.randn(t.shape, generator=g, device=DEVICE)
                for t in rope_tables(D, offset + T + 3))
    qo, ko = rope(q, k, cos, sin, offset)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    q32, k32 = upcast(q), upcast(k)
    qo32, ko32 = ref.rope(q32, k32, cos, sin, offset)
    gq32, gk32 = torch.autograd.grad((qo32, ko32), (q32, k32), (dq.float(), dk.float()))
    assert qo.dtype == ko.dtype == gq.dtype == dtype
    for name, a, b in (("q", qo, qo32), ("k", ko, ko32), ("dq", gq, gq32), ("dk", gk, gk32)):
        assert_close(a, b, TOL[dtype], name)


def test_rope_strided_inputs_and_arbitrary_tables():
    """q and k as transposed views (B, H, T, D) -> (B, T, H, D), k with a non-unit last stride, and cos/sin tables
    whose two halves differ (the kernel must use each half of the row, as the reference does)."""
    g = gen(6)
    B, T, Hq, Hkv, D = 2, 6, 8, 2, 80
    qb = randn((B, Hq, T, D), g)
    kb = randn((B, T, Hkv, 2 * D), g)
    q, k = qb.transpose(1, 2), kb[..., ::2]
    cos, sin = torch.randn(T + 2, D, generator=g, device=DEVICE), torch.randn(T + 2, D, generator=g, device=DEVICE)
    dq, dk = randn((B, T, Hq, D), g, requires_grad=False), randn((B, T, Hkv, D), g, requires_grad=False)
    qo, ko = rope(q, k, cos, sin, 2)
    gq, gk = torch.autograd.grad((qo, ko), (qb, kb), (dq, dk))
    qb32, kb32 = upcast(qb), upcast(kb)
    qo32, ko32 = ref.rope(qb32.transpose(1, 2), kb32[..., ::2], cos, sin, 2)
    gq32, gk32 = torch.autograd.grad((qo32, ko32), (qb32, kb32), (dq, dk))
    for name, a, b in (("q", qo, qo32), ("k", ko, ko32), ("dq", gq, gq32), ("dk", gk, gk32)):
        assert_close(a, b, TOL[torch.float32], name)


def test_rope_bad_input_names_the_file():
    q, k = torch.randn(1, 4, 8, 64, device=DEVICE), torch.randn(1, 4, 2, 64, device=DEVICE)
    cos, sin = rope_tables(64, 5)
    with pytest.raises(ValueError, match="kernels/rope.py.*offset \\+ T"):
        rope(q, k, cos.to(DEVICE), sin.to(DEVICE), offset=2)
    with pytest.raises(ValueError, match="kernels/rope.py.*same B, T, D"):
        rope(q, k[:, :3], cos.to(DEVICE), sin.to(DEVICE))


# ---------------------------------------------------------------------------------------------------- q/k norm + RoPE

QK_NORM_ROPE_SHAPES = [  # (B, T, Hq, Hkv, D, offset)
    (2, 5, 8, 4, 96, 0),    # minimind-3: 8 q / 4 kv heads of 96 (half 48: the tile's 64 lanes are masked)
    (1, 3, 8, 4, 96, 9),    # an offset, as in cached decoding
    (2, 4, 8, 2, 64, 1),    # MiniMind2's head dim with the norm switched on
    (1, 6, 6, 3, 96, 0),    # 3 kv heads, 6 q heads: neither a power of two
    (1, 1, 8, 4, 96, 30),   # one token
    (1, 17, 4, 4, 64, 2),   # B = 1 and many rows: the generation engine's (1, batch, H, D) decode layout
] + ([(8, 512, 8, 4, 96, 0), (4, 256, 8, 4, 96, 100)] if CUDA else [])


def _qk_norm_rope_case(B, T, Hq, Hkv, D, offset, dtype, seed, scale=1.0, eps=1e-6):
    """Run the kernel and the float32 reference on the same values, cos/sin tables whose two halves differ and
    random norm weights; returns {name: (ours, reference)} for the outputs and all four gradients."""
    g = gen(seed)
    q, k = randn((B, T, Hq, D), g, dtype, scale=scale), randn((B, T, Hkv, D), g, dtype, scale=scale)
    qw, kw = 1 + randn((D,), g, scale=0.3), 1 + randn((D,), g, scale=0.3)
    qw, kw = qw.detach().requires_grad_(), kw.detach().requires_grad_()
    cos, sin = torch.randn(offset + T + 2, D, generator=g, device=DEVICE), torch.randn(offset + T + 2, D,
                                                                                      generator=g, device=DEVICE)
    dq, dk = randn((B, T, Hq, D), g, dtype, requires_grad=False), randn((B, T, Hkv, D), g, dtype, requires_grad=False)
    qo, ko = qk_norm_rope(q, k, qw, kw, cos, sin, offset, eps)
    grads = torch.autograd.grad((qo, ko), (q, k, qw, kw), (dq, dk))
    ups = [upcast(t) for t in (q, k, qw, kw)]
    qo32, ko32 = ref.qk_norm_rope(*ups, cos, sin, offset, eps)
    grads32 = torch.autograd.grad((qo32, ko32), ups, (dq.float(), dk.float()))
    assert qo.dtype == ko.dtype == grads[0].dtype == grads[1].dtype == dtype
    assert grads[2].dtype == grads[3].dtype == torch.float32
    names = ("q", "k", "dq", "dk", "dq_weight", "dk_weight")
    return dict(zip(names, zip((qo, ko, *grads), (qo32, ko32, *grads32))))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,offset", QK_NORM_ROPE_SHAPES)
def test_qk_norm_rope(B, T, Hq, Hkv, D, offset, dtype):
    for name, (a, b) in _qk_norm_rope_case(B, T, Hq, Hkv, D, offset, dtype, seed=B * 1000 + T * 10 + D).items():
        assert_close(a, b, TOL[dtype], name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_qk_norm_rope_rows_small_enough_that_eps_matters(dtype):
    """Rows of RMS 1e-3: mean(x^2) = 1e-6 = eps, so a kernel that dropped eps (or used another) is off by ~40%."""
    for name, (a, b) in _qk_norm_rope_case(2, 3, 8, 4, 96, 1, dtype, seed=21, scale=1e-3, eps=1e-6).items():
        assert_close(a, b, TOL[dtype], name)
    wrong = _qk_norm_rope_case(2, 3, 8, 4, 96, 1, torch.float32, seed=21, scale=1e-3, eps=0.0)["q"][0]
    right = _qk_norm_rope_case(2, 3, 8, 4, 96, 1, torch.float32, seed=21, scale=1e-3, eps=1e-6)["q"][0]
    assert (wrong - right).abs().max() > 0.1 * right.abs().max()


def test_qk_norm_rope_strided_inputs_deterministic_weight_grads_and_empty_input():
    """q and k as views of one fused projection (B, T, (Hq + Hkv) * D) split by heads, as a fused qkv would give;
    the norm weights' gradients come out bit-identical on a second run (no atomics); no tokens works."""
    g = gen(22)
    B, T, Hq, Hkv, D = 2, 7, 8, 4, 96
    qk = randn((B, T, (Hq + Hkv) * D), g)
    qw, kw = randn((D,), g), randn((D,), g)
    cos, sin = (t.to(DEVICE) for t in rope_tables(D, T + 3))
    dq, dk = randn((B, T, Hq, D), g, requires_grad=False), randn((B, T, Hkv, D), g, requires_grad=False)
    runs = []
    for _ in range(2):
        q, k = qk[..., :Hq * D].view(B, T, Hq, D), qk[..., Hq * D:].view(B, T, Hkv, D)
        out = qk_norm_rope(q, k, qw, kw, cos, sin, 3)
        runs.append((out, torch.autograd.grad(out, (qk, qw, kw), (dq, dk))))
    qk32, qw32, kw32 = upcast(qk), upcast(qw), upcast(kw)
    out32 = ref.qk_norm_rope(qk32[..., :Hq * D].view(B, T, Hq, D), qk32[..., Hq * D:].view(B, T, Hkv, D), qw32,
                             kw32, cos, sin, 3)
    grads32 = torch.autograd.grad(out32, (qk32, qw32, kw32), (dq, dk))
    (out, grads) = runs[0]
    for name, a, b in zip(("q", "k", "dqk", "dq_weight", "dk_weight"), (*out, *grads), (*out32, *grads32)):
        assert_close(a, b, TOL[torch.float32], name)
    assert torch.equal(runs[0][1][1], runs[1][1][1]) and torch.equal(runs[0][1][2], runs[1][1][2])
    e = torch.zeros(0, 4, Hq, D, device=DEVICE, requires_grad=True)
    qo, ko = qk_norm_rope(e, e[:, :, :Hkv], qw, kw, cos, sin)
    assert qo.shape == (0, 4, Hq, D) and ko.shape == (0, 4, Hkv, D)
    assert torch.equal(torch.autograd.grad(qo.sum() + ko.sum(), qw)[0], torch.zeros_like(qw))


def test_qk_norm_rope_bad_input_names_the_file():
    q, k = torch.randn(1, 4, 8, 64, device=DEVICE), torch.randn(1, 4, 2, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope_tables(64, 5))
    with pytest.raises(ValueError, match="kernels/qk_norm_rope.py.*offset \\+ T"):
        qk_norm_rope(q, k, w, w, cos, sin, offset=2)
    with pytest.raises(ValueError, match="kernels/qk_norm_rope.py.*q_weight and k_weight"):
        qk_norm_rope(q, k, w, w[:32], cos, sin)
    with pytest.raises(ValueError, match="kernels/qk_norm_rope.py.*same B, T, D"):
        qk_norm_rope(q, k[:, :3], w, w, cos, sin)


# ---------------------------------------------------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = [(1, 1), (3, 123), (37, 1728), (2, 5, 640)] + ([(4096, 1728), (16384, 2048)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=str)
def test_swiglu(shape, dtype):
    g = gen(sum(shape))
    gate, up = randn(shape, g, dtype, scale=3.0), randn(shape, g, dtype)  # gate spread over the sigmoid's range
    dy = randn(shape, g, dtype, requires_grad=False)
    y = swiglu(gate, up)
    dg, du = torch.autograd.grad(y, (gate, up), dy)
    g32, u32 = upcast(gate), upcast(up)
    y32 = ref.swiglu(g32, u32)
    dg32, du32 = torch.autograd.grad(y32, (g32, u32), dy.float())
    assert y.dtype == dg.dtype == du.dtype == dtype
    assert_close(y, y32, TOL[dtype], "y")
    assert_close(dg, dg32, TOL[dtype], "dgate")
    assert_close(du, du32, TOL[dtype], "dup")


def test_swiglu_non_contiguous_and_bad_input():
    g = gen(8)
    gu = randn((6, 2 * 640), g)
    gate, up = gu[:, :640], gu[:, 640:]  # halves of one projection: strided views
    dy = randn((6, 640), g, requires_grad=False)
    (dgu,) = torch.autograd.grad(swiglu(gate, up), gu, dy)
    gu32 = upcast(gu)
    (dgu32,) = torch.autograd.grad(ref.swiglu(gu32[:, :640], gu32[:, 640:]), gu32, dy)
    assert_close(dgu, dgu32, TOL[torch.float32], "d(gate, up)")
    with pytest.raises(ValueError, match="kernels/swiglu.py"):
        swiglu(gate, up[:, :10])


# ---------------------------------------------------------------------------------------------------------- liger peer

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_liger_backend_matches_reference(dtype):
    """kernels/liger_ops.py adapts liger-kernel's layouts and reductions to ours (runs where liger and CUDA are)."""
    from kernels.backend import get_backend, liger_unavailable_reason
    if liger_unavailable_reason():
        pytest.skip(liger_unavailable_reason())
    liger = get_backend("liger")
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # another implementation: its own chunking and sum orders
    g = gen(9)
    x, r, w = randn((64, 640), g, dtype), randn((64, 640), g, dtype), randn((640,), g)
    q, k = randn((2, 32, 8, 80), g, dtype), randn((2, 32, 2, 80), g, dtype)
    cos, sin = (t.to(DEVICE) for t in rope_tables(80, 40))
    hidden, weight = randn((64, 640), g, dtype), randn((6400, 640), g, dtype, scale=0.05)
    qw, kw = 1 + randn((80,), g, scale=0.3), 1 + randn((80,), g, scale=0.3)
    labels = torch.randint(0, 6400, (64,), generator=g, device=DEVICE)
    labels[:5] = -100
    token_weights = torch.rand(64, generator=g, device=DEVICE) + 0.5
    cases = {
        "rms_norm": lambda ops, a: ops.rms_norm(a[0], a[2], 1e-5),
        "add_rms_norm": lambda ops, a: ops.add_rms_norm(a[0], a[1], a[2], 1e-5),
        "swiglu": lambda ops, a: ops.swiglu(a[0], a[1]),
        "rope": lambda ops, a: ops.rope(a[3].clone(), a[4].clone(), cos, sin, 3),  # liger rotates in place
        "qk_norm_rope": lambda ops, a: ops.qk_norm_rope(a[3], a[4], a[7], a[8], cos, sin, 3, 1e-6),
        "linear_cross_entropy": lambda ops, a: ops.linear_cross_entropy(a[5], a[6], labels,
                                                                        token_weights=token_weights, z_loss=1e-4),
        "linear_logprobs": lambda ops, a: ops.linear_logprobs(a[5], a[6], labels),
    }
    inputs = (x, r, w, q, k, hidden, weight, qw.detach().requires_grad_(), kw.detach().requires_grad_())
    for name, run in cases.items():
        out = run(liger, inputs)
        out = out if isinstance(out, tuple) else (out,)
        ups = tuple(upcast(t) for t in inputs)
        expected = run(get_backend("torch"), ups)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for i, (a, b) in enumerate(zip(out, expected)):
            assert_close(a, b, tol, f"liger {name} output {i}")
        dys = [torch.randn(o.shape, generator=g, device=DEVICE) for o in expected]
        used = [t for t in inputs if t.requires_grad]
        # clones: liger's rope backward rotates the incoming gradient in place
        grads = torch.autograd.grad(out, used, [d.to(o.dtype).clone() for d, o in zip(dys, out)], allow_unused=True)
        grads32 = torch.autograd.grad(expected, [u for u, t in zip(ups, inputs) if t.requires_grad], dys,
                                      allow_unused=True)
        for a, b in zip(grads, grads32):
            if b is not None:
                assert_close(a, b, tol, f"liger {name} gradient")


def test_liger_adapters_under_the_interpreter():
    """The liger adapters with the most logic of their own (rope's table layout and offset; the loss's ignore_index,
    token weights, z-loss and log-probs) against the reference, forward and backward. liger's own kernels run under
    Triton's interpreter on CPU tensors for these ops (not for its norm and SwiGLU kernels), so this runs in CI."""
    pytest.importorskip("liger_kernel")
    if DEVICE != "cpu":
        pytest.skip("test_liger_backend_matches_reference covers every op on a GPU")
    from kernels import liger_ops, reference
    g = gen(11)
    q, k = randn((2, 12, 4, 32), g), randn((2, 12, 2, 32), g)
    cos, sin = rope_tables(32, 20)
    hidden, weight = randn((48, 64), g), randn((300, 64), g, scale=0.2)
    labels = torch.randint(0, 300, (48,), generator=g)
    labels[:5] = -100
    token_weights = torch.rand(48, generator=g) + 0.5
    cases = {
        "rope": (lambda ops, a: ops.rope(a[0].clone(), a[1].clone(), cos, sin, 3), 0),
        "linear_cross_entropy": (lambda ops, a: ops.linear_cross_entropy(
            a[2], a[3], labels, token_weights=token_weights, z_loss=1e-3), 2),
        "sum": (lambda ops, a: ops.linear_cross_entropy(a[2], a[3], labels, reduction="sum"), 2),
        "linear_logprobs": (lambda ops, a: ops.linear_logprobs(a[2], a[3], labels), 2),
    }
    inputs = (q, k, hidden, weight)
    for name, (run, first) in cases.items():
        used = inputs[first:first + 2]
        out = run(liger_ops, inputs)
        out = out if isinstance(out, tuple) else (out,)
        ups = tuple(t.detach().double().requires_grad_() for t in inputs)
        expected = run(reference, ups)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for i, (a, b) in enumerate(zip(out, expected)):
            assert_close(a, b, 1e-5, f"liger {name} output {i}")  # fp32 against fp64
        dys = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in expected]
        grads = torch.autograd.grad(out, used, [d.float() for d in dys])
        want = torch.autograd.grad(expected, ups[first:first + 2], dys)
        for a, b in zip(grads, want):
            assert_close(a, b, 1e-5, f"liger {name} gradient")
