"""minimind-3's q/k norm fused into RoPE: q and k of a token normalised and rotated in one Triton launch, forward and
backward (the two norm weights' gradients included).

For a head x (D = 2 * half; halves x1, x2), its norm weight w (D,) shared by all heads of q (of k), and the cos/sin
row of position offset + t (halves c1, c2 and s1, s2):

    forward   rstd = 1 / sqrt(mean(x^2) + eps);  n = x * rstd * w               (RMSNorm over the head dim)
              y1 = n1 * c1 - n2 * s1;  y2 = n2 * c2 + n1 * s2                   (rotate-half RoPE, as kernels/rope.py)
    backward  dn1 = dy1 * c1 + dy2 * s2;  dn2 = dy2 * c2 - dy1 * s1             (the inverse rotation)
              xhat = x * rstd;  g = dn * w
              dx = rstd * (g - xhat * mean(g * xhat))                           (per head)
              dw = sum over tokens and heads of dn * xhat

The forward runs one program per token (b, t): all Hq query heads and all Hkv key heads as (heads, half) tiles
(the tiles of kernels/rope.py), n never leaves registers. It saves only q and k; the backward recomputes rstd.
The backward is one launch too: P programs, each looping over tokens pid, pid + P, ... for the q heads and then
again for the k heads, the weight-gradient partial in registers, stored as a (P, D) float32 row per weight and
summed by torch: deterministic, no atomics. Inputs may be strided (unit last-dim stride); outputs are new
contiguous tensors. Math in float32, outputs in the inputs' dtypes, weight gradients in the weights' dtypes.
"""
import torch
import triton
import triton.language as tl

from kernels.rms_norm import rms_norm_bwd_programs
from kernels.rope import check_rope_args, rope_config


@triton.jit
def _load_heads(X, base, head_stride, n_heads, half, d, dmask, BLOCK_H: tl.constexpr):
    """The two halves (BLOCK_H, BLOCK_HALF) of a token's heads in float32, masked lanes 0; and the mask."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < n_heads) & dmask
    ptr = X + base + heads * head_stride + d
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + half, mask=mask, other=0.0).to(tl.float32)
    return x1, x2, mask


@triton.jit
def _norm_rope_heads_fwd(X, W, O, x_base, o_base, x_head_stride, n_heads, half, eps, c1, c2, s1, s2, d, dmask,
                         BLOCK_H: tl.constexpr):
    x1, x2, mask = _load_heads(X, x_base, x_head_stride, n_heads, half, d, dmask, BLOCK_H)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)[:, None]
    n1 = x1 * rstd * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)
    n2 = x2 * rstd * tl.load(W + half + d, mask=dmask, other=0.0).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)[:, None]
    o_ptr = O + o_base + heads * (2 * half) + d
    tl.store(o_ptr, (n1 * c1 - n2 * s1).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, (n2 * c2 + n1 * s2).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_heads_bwd(X, W, DY, DX, x_base, g_base, x_head_stride, n_heads, half, inv_d, eps, c1, c2, s1, s2, d,
                         dmask, BLOCK_H: tl.constexpr):
    """Stores dx of a token's heads; returns their (dw1, dw2) contributions (1, BLOCK_HALF), summed over heads.
    inv_d = 1 / D, multiplied rather than divided by inside the loop."""
    x1, x2, mask = _load_heads(X, x_base, x_head_stride, n_heads, half, d, dmask, BLOCK_H)
    dy1, dy2, _ = _load_heads(DY, g_base, 2 * half, n_heads, half, d, dmask, BLOCK_H)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) * inv_d + eps)[:, None]
    dn1 = dy1 * c1 + dy2 * s2
    dn2 = dy2 * c2 - dy1 * s1
    xhat1 = x1 * rstd
    xhat2 = x2 * rstd
    g1 = dn1 * tl.load(W + d, mask=dmask, other=0.0).to(tl.float32)
    g2 = dn2 * tl.load(W + half + d, mask=dmask, other=0.0).to(tl.float32)
    mean_gx = ((tl.sum(g1 * xhat1, axis=1) + tl.sum(g2 * xhat2, axis=1)) * inv_d)[:, None]
    heads = tl.arange(0, BLOCK_H)[:, None]
    dx_ptr = DX + g_base + heads * (2 * half) + d
    tl.store(dx_ptr, (rstd * (g1 - xhat1 * mean_gx)).to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + half, (rstd * (g2 - xhat2 * mean_gx)).to(DX.dtype.element_ty), mask=mask)
    return tl.sum(dn1 * xhat1, axis=0)[None, :], tl.sum(dn2 * xhat2, axis=0)[None, :]


@triton.jit
def _cos_sin_halves(COS, SIN, t, offset, cos_stride, half, d, dmask):
    cs = (t + offset) * cos_stride + d
    c1 = tl.load(COS + cs, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + half, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + half, mask=dmask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _qk_norm_rope_fwd_kernel(Q, K, QW, KW, QO, KO, COS, SIN, seq_len, offset, q_sb, q_st, q_sh, k_sb, k_st, k_sh,
                             cos_stride, n_q_heads, n_kv_heads, half, eps,
                             BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < half
    c1, c2, s1, s2 = _cos_sin_halves(COS, SIN, t, offset, cos_stride, half, d, dmask)
    _norm_rope_heads_fwd(Q, QW, QO, b * q_sb + t * q_st, token * n_q_heads * 2 * half, q_sh, n_q_heads, half, eps,
                         c1, c2, s1, s2, d, dmask, BLOCK_HQ)
    _norm_rope_heads_fwd(K, KW, KO, b * k_sb + t * k_st, token * n_kv_heads * 2 * half, k_sh, n_kv_heads, half, eps,
                         c1, c2, s1, s2, d, dmask, BLOCK_HKV)


@triton.jit
def _heads_bwd_loop(X, W, DY, DX, DW_PARTIAL, COS, SIN, pid, n_programs, n_tokens, seq_len, offset, x_sb, x_st, x_sh,
                    cos_stride, n_heads, half, eps, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Tokens pid, pid + n_programs, ... of one of q, k: their dx, and this program's row of the weight gradient."""
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = d < half
    dw1 = tl.zeros([1, BLOCK_HALF], dtype=tl.float32)
    dw2 = tl.zeros([1, BLOCK_HALF], dtype=tl.float32)
    inv_d = 1.0 / (2 * half)
    for tok in range(pid, n_tokens, n_programs):
        # b, t by 32-bit division (a 64-bit one is a called routine); addresses in 64 bits
        b32 = tl.cast(tok, tl.int32) // seq_len  # tl.cast: tok is a Python int under the interpreter
        t = (tok - b32 * seq_len).to(tl.int64)
        c1, c2, s1, s2 = _cos_sin_halves(COS, SIN, t, offset, cos_stride, half, d, dmask)
        a1, a2 = _norm_rope_heads_bwd(X, W, DY, DX, b32.to(tl.int64) * x_sb + t * x_st,
                                      tl.cast(tok, tl.int64) * n_heads * 2 * half, x_sh, n_heads, half, inv_d, eps,
                                      c1, c2, s1, s2, d, dmask, BLOCK_H)
        dw1 += a1
        dw2 += a2
    row = pid.to(tl.int64) * 2 * half
    tl.store(DW_PARTIAL + row + d, dw1, mask=dmask)
    tl.store(DW_PARTIAL + row + half + d, dw2, mask=dmask)


@triton.jit
def _qk_norm_rope_bwd_kernel(Q, K, QW, KW, DQO, DKO, DQ, DK, DQW_PARTIAL, DKW_PARTIAL, COS, SIN, n_tokens, seq_len,
                             offset, q_sb, q_st, q_sh, k_sb, k_st, k_sh, cos_stride, n_q_heads, n_kv_heads, half, eps,
                             BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # q's tokens, then k's: one head group's state live at a time (both in one loop spilled on sm_80)
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    _heads_bwd_loop(Q, QW, DQO, DQ, DQW_PARTIAL, COS, SIN, pid, n_programs, n_tokens, seq_len, offset, q_sb, q_st,
                    q_sh, cos_stride, n_q_heads, half, eps, BLOCK_HQ, BLOCK_HALF)
    _heads_bwd_loop(K, KW, DKO, DK, DKW_PARTIAL, COS, SIN, pid, n_programs, n_tokens, seq_len, offset, k_sb, k_st,
                    k_sh, cos_stride, n_kv_heads, half, eps, BLOCK_HKV, BLOCK_HALF)


def qk_norm_rope_config(n_q_heads, n_kv_heads, head_dim):
    """(BLOCK_HQ, BLOCK_HKV, BLOCK_HALF, forward warps, backward warps): kernels/rope.py's tiles and forward warps;
    the backward holds x, dy and their products for a head group at once and runs 8 warps, which keeps it at <= 64
    registers with no spill on sm_80/86/90 (4 warps spilled on sm_80; kernels.aot --report)."""
    block_hq, block_hkv, block_half, warps = rope_config(n_q_heads, n_kv_heads, head_dim)
    return block_hq, block_hkv, block_half, warps, 8


def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


class QKNormRoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, q_weight, k_weight, cos, sin, offset, eps):
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        cos, sin = cos.contiguous(), sin.contiguous()
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
        qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        block_hq, block_hkv, block_half, warps, _ = qk_norm_rope_config(Hq, Hkv, D)
        if B * T:
            _qk_norm_rope_fwd_kernel[(B * T,)](q, k, q_weight, k_weight, qo, ko, cos, sin, T, offset, *_strides(q),
                                               *_strides(k), cos.stride(0), Hq, Hkv, D // 2, eps,
                                               BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_HALF=block_half,
                                               num_warps=warps)
        ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
        ctx.offset, ctx.eps = offset, eps
        return qo, ko

    @staticmethod
    def backward(ctx, dqo, dko):
        q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors  # an unused output's gradient arrives as zeros
        B, T, Hq, D = q.shape
        Hkv = k.shape[2]
        dqo, dko = dqo.contiguous(), dko.contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        block_hq, block_hkv, block_half, _, warps = qk_norm_rope_config(Hq, Hkv, D)
        programs = rms_norm_bwd_programs(B * T, warps, q.device)
        dqw = torch.empty(programs, D, dtype=torch.float32, device=q.device)
        dkw = torch.empty(programs, D, dtype=torch.float32, device=q.device)
        if B * T:
            _qk_norm_rope_bwd_kernel[(programs,)](q, k, q_weight, k_weight, dqo, dko, dq, dk, dqw, dkw, cos, sin,
                                                  B * T, T, ctx.offset, *_strides(q), *_strides(k), cos.stride(0),
                                                  Hq, Hkv, D // 2, ctx.eps, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv,
                                                  BLOCK_HALF=block_half, num_warps=warps)
        else:
            dqw.zero_()
            dkw.zero_()
        return dq, dk, dqw.sum(0).to(q_weight.dtype), dkw.sum(0).to(k_weight.dtype), None, None, None, None


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, offset=0, eps=1e-6):
    """q (B, T, Hq, D), k (B, T, Hkv, D); q_weight, k_weight (D,); cos, sin (>= offset + T, D)
    -> normalised and rotated (q, k), same shapes and dtypes. See the module docstring."""
    check_rope_args(q, k, cos, sin, offset, where="kernels/qk_norm_rope.py")
    D = q.shape[3]
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"kernels/qk_norm_rope.py: q_weight and k_weight must be (D = {D},); got "
                         f"{tuple(q_weight.shape)}, {tuple(k_weight.shape)}")
    return QKNormRoPEFunction.apply(q, k, q_weight, k_weight, cos, sin, int(offset), float(eps))


def traffic(kernel, grid, args):
    """Bytes one launch of `kernel` (a kernel of this file) reads and writes, per pointer argument:
    {name: (read, written)}, each distinct byte its tl.load / tl.store touch counted once (the norm weights and the
    cos / sin rows, shared by every token, count once). bench/launches.py uses it; tests/test_traffic.py checks it."""
    if kernel not in ("_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"):
        return None
    head_dim = 2 * args["half"]
    tokens = grid[0] if kernel == "_qk_norm_rope_fwd_kernel" else args["n_tokens"]
    positions = min(args["seq_len"], tokens)  # the rows offset .. offset + T - 1 of the tables

    def size(name, n):
        return n * head_dim * args[name].element_size()
    q, k = tokens * args["n_q_heads"], tokens * args["n_kv_heads"]
    common = {"Q": (size("Q", q), 0), "K": (size("K", k), 0), "QW": (size("QW", 1), 0), "KW": (size("KW", 1), 0),
              "COS": (size("COS", positions), 0), "SIN": (size("SIN", positions), 0)}
    if kernel == "_qk_norm_rope_fwd_kernel":
        return {**common, "QO": (0, size("QO", q)), "KO": (0, size("KO", k))}
    return {**common, "DQO": (size("DQO", q), 0), "DKO": (size("DKO", k), 0), "DQ": (0, size("DQ", q)),
            "DK": (0, size("DK", k)), "DQW_PARTIAL": (0, size("DQW_PARTIAL", grid[0])),
            "DKW_PARTIAL": (0, size("DKW_PARTIAL", grid[0]))}
