"""Rotary position embedding (rotate-half layout) for q and k in one Triton launch, forward and backward.

With x = (x1, x2) the two halves of a head (D = 2 * half) and (c1, c2), (s1, s2) the halves of the cos/sin row
for position offset + t:

    forward   y1 = x1 * c1 - x2 * s1        y2 = x2 * c2 + x1 * s2          (= x * cos + rotate_half(x) * sin)
    backward  dx1 = dy1 * c1 + dy2 * s2     dx2 = dy2 * c2 - dy1 * s1       (the transpose: the inverse rotation)

Both directions are one kernel: y1 = x1 * c1 - x2 * a, y2 = x2 * c2 + x1 * b with (a, b) = (s1, s2) forward and
(-s2, -s1) backward. One program handles one token (b, t): all Hq query heads and all Hkv key heads, as
(heads, half) tiles. Inputs may be strided (any strides with a unit last-dim stride); outputs are new contiguous
tensors (out of place, so autograd never sees a modified saved tensor). Math in float32, outputs in the inputs'
dtypes.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, O, x_base, o_base, x_head_stride, n_heads, half, c1, c2, a, b, d, dmask,
                  BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < n_heads) & dmask
    x_ptr = X + x_base + heads * x_head_stride + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    o_ptr = O + o_base + heads * (2 * half) + d
    tl.store(o_ptr, (x1 * c1 - x2 * a).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, (x2 * c2 + x1 * b).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, seq_len, offset, q_sb, q_st, q_sh, k_sb, k_st, k_sh, cos_stride,
                 n_q_heads, n_kv_heads, half,
                 BACKWARD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < half
    cs = (t + offset) * cos_stride + d
    c1 = tl.load(COS + cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + half, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        a = -s2
        bb = -s1
    else:
        a = s1
        bb = s2
    _rotate_heads(Q, QO, b * q_sb + t * q_st, token * n_q_heads * 2 * half, q_sh, n_q_heads, half,
                  c1, c2, a, bb, d, dmask, BLOCK_HQ)
    _rotate_heads(K, KO, b * k_sb + t * k_st, token * n_kv_heads * 2 * half, k_sh, n_kv_heads, half,
                  c1, c2, a, bb, d, dmask, BLOCK_HKV)


def rope_config(n_q_heads, n_kv_heads, head_dim):
    """(BLOCK_HQ, BLOCK_HKV, BLOCK_HALF, num_warps) for one token's heads: at least 2 warps, so that the resident
    programs (at most 32 per SM) fill the SM; ~4-8 elements of the q tile per thread."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_hq, block_hkv = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_kv_heads)
    elements = (block_hq + block_hkv) * block_half * 2
    return block_hq, block_hkv, block_half, min(8, max(2, triton.next_power_of_2(elements) // 512))


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q, k, cos, sin, offset, backward):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T:
        block_hq, block_hkv, block_half, warps = rope_config(Hq, Hkv, D)
        _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, T, offset, q.stride(0), q.stride(1), q.stride(2),
                               k.stride(0), k.stride(1), k.stride(2), cos.stride(0), Hq, Hkv, D // 2,
                               BACKWARD=backward, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half,
                               num_warps=warps)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, offset):
        ctx.save_for_backward(cos, sin)
        ctx.offset = offset
        return _launch(q, k, cos, sin, offset, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # an unused output's gradient arrives as zeros (materialize_grads)
        dq, dk = _launch(dq, dk, cos, sin, ctx.offset, backward=True)
        return dq, dk, None, None, None


def check_rope_args(q, k, cos, sin, offset, where="kernels/rope.py"):
    """ValueError, naming `where`, unless q (B, T, Hq, D), k (B, T, Hkv, D) with D even, cos and sin
    (>= offset + T, D) and offset >= 0 (kernels/qk_norm_rope.py checks its q, k and tables with it too)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: q must be (B, T, Hq, D) and k (B, T, Hkv, D) with the same B, T, D; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    T, D = q.shape[1], q.shape[3]
    if D % 2:
        raise ValueError(f"{where}: head dim must be even, got {D}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != D or cos.shape[0] < offset + T:
        raise ValueError(f"{where}: cos and sin must be (>= offset + T = {offset + T}, D = {D}); "
                         f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    if offset < 0:
        raise ValueError(f"{where}: offset must be >= 0, got {offset}")


def rope(q, k, cos, sin, offset=0):
    """q (B, T, Hq, D), k (B, T, Hkv, D); cos, sin (>= offset + T, D) -> rotated (q, k), same shapes and dtypes."""
    check_rope_args(q, k, cos, sin, offset)
    return RoPEFunction.apply(q, k, cos, sin, int(offset))


def traffic(kernel, grid, args):
    """Bytes one launch of `kernel` (a kernel of this file) reads and writes, per pointer argument:
    {name: (read, written)}, each distinct byte its tl.load / tl.store touch counted once (so the cos / sin rows,
    shared by the batch, count once). bench/launches.py uses it; tests/test_traffic.py checks it."""
    if kernel != "_rope_kernel":
        return None
    tokens, head_dim = grid[0], 2 * args["half"]
    positions = min(args["seq_len"], tokens)  # the rows offset .. offset + T - 1 of the tables
    q = tokens * args["n_q_heads"] * head_dim * args["Q"].element_size()
    k = tokens * args["n_kv_heads"] * head_dim * args["K"].element_size()
    return {"Q": (q, 0), "K": (k, 0), "QO": (0, q), "KO": (0, k),
            "COS": (positions * head_dim * args["COS"].element_size(), 0),
            "SIN": (positions * head_dim * args["SIN"].element_size(), 0)}
