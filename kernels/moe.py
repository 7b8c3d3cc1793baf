"""Mixture-of-experts SwiGLU layer as grouped GEMMs in Triton, forward and backward, with sync-free routing.

Same math as kernels.reference.moe_experts. N tokens, H hidden, K experts per token, M = N*K token slots
(slot s = n*K + k is token n's k-th choice), E experts of width I:

    y_s   = (silu(x_n Wg_e^T) * x_n Wu_e^T) Wd_e^T      for slot s of token n routed to expert e = topk_idx[n, k]
    out_n = sum_k topk_weight[n, k] * y_{nK+k}

Routing stays on the device: a stable sort of the M expert ids gives `perm` (slots in expert order) and
a searchsorted gives `offsets` (E+1,), expert e owning sorted rows offsets[e]:offsets[e+1]. Nothing is read
back to the host: each grouped-GEMM grid is sized for the worst case, cdiv(M, BLOCK_M) + E row tiles, and
every program walks the E offsets to find its expert and row tile (tiles are numbered expert by expert);
the programs past the last tile return at once.

Forward: `_gate_up_kernel` gathers token rows x[perm // K] in its loads, computes both projections and
stores h = silu(g) * u (sorted rows, in x's dtype, the rounding the reference does before the down
projection); `_rows_to_slots_kernel` computes y = h Wd_e^T and stores each row at its slot; `_combine_kernel`
sums out_n = sum_k w_nk y_{nK+k} per token (deterministic, no atomics). Saved for backward: the inputs,
perm and offsets; nothing of size M x I.

Backward with dout (N, H), slot s of token n with weight w = topk_weight[n, k]:
    dh_s = w * (dout_n Wd_e)                 (recomputing g, u in the same pass over H: _gate_up_kernel BACKWARD)
    dg_s = dh_s * u * silu'(g),  du_s = dh_s * silu(g)
    dw_s = sum_h dout_n,h y_s,h = sum_i h_s,i (dout_n Wd_e)_i      (per I tile, summed in torch)
    dx_n = sum_k (dg_s Wg_e + du_s Wu_e)      (_rows_to_slots_kernel with two products, then _combine_kernel)
    dWg_e = sum_{s in e} dg_s^T x_n,  dWu_e = sum du_s^T x_n,  dWd_e = sum (w dout_n)^T h_s   (_weight_grad_kernel;
    an expert without tokens runs no loop iteration and stores exact zeros)
All products accumulate in float32; fp32 inputs use IEEE products (no TF32).
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Tiles:
    """One launch configuration of a kernel: block sizes (powers of two >= 16 for tl.dot) and warps/stages."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Chosen per element size (2: bf16/fp16 on tensor cores, 4: fp32 IEEE products on FMA units) so that none spills
# registers on sm_80/86/90 and each fits sm_86's 99 KB of shared memory (kernels/aot.py compiles and reports them).
# gate_up: rows x I tile, reduction over H (two accumulators, three in the backward);
# rows_to_slots: rows x H tile, reduction over I; weight_grad: (P x Q) tile of one expert's weight gradient,
# reduction over that expert's rows in steps of block_k.
TILES = {
    "gate_up": {2: Tiles(128, 64, 64, 8, 3), 4: Tiles(32, 64, 16, 4, 2)},
    "gate_up_backward": {2: Tiles(64, 64, 32, 8, 3), 4: Tiles(32, 32, 16, 4, 2)},
    "rows_to_slots": {2: Tiles(128, 128, 32, 8, 3), 4: Tiles(64, 64, 16, 4, 2)},
    "weight_grad": {2: Tiles(128, 128, 32, 8, 3), 4: Tiles(64, 64, 16, 4, 2)},
}


def combine_block(C):
    """Columns per program of _combine_kernel: the whole row up to 1024."""
    return min(triton.next_power_of_2(C), 1024)


def _empty(shape, dtype, device):
    """Every float buffer the kernels fill is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_flags(dtype):
    """UPCAST and PRECISION of _dot for operands of this dtype: IEEE fp32 products for fp32 (no TF32)."""
    upcast = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return dict(UPCAST=upcast, PRECISION="ieee" if dtype == torch.float32 else "tf32")


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in float32. UPCAST (bf16 under the interpreter, whose bf16 dot is wrong) multiplies in fp32,
    which is exact for bf16 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _find_tile(OFFSETS, pid_m, E, BLOCK_M: tl.constexpr):
    """Expert, first row and end row of row tile pid_m; tiles are numbered expert by expert,
    cdiv(count_e, BLOCK_M) of them for expert e. A pid past the last tile gets an empty range."""
    zero = pid_m * 0
    expert, row_start, row_end, first_tile = zero, zero, zero, zero
    hi = tl.load(OFFSETS)
    for e in range(E):
        lo = hi
        hi = tl.load(OFFSETS + e + 1)
        n_tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
        here = (pid_m >= first_tile) & (pid_m < first_tile + n_tiles)
        expert = tl.where(here, e, expert)
        row_start = tl.where(here, lo + (pid_m - first_tile) * BLOCK_M, row_start)
        row_end = tl.where(here, hi, row_end)
        first_tile += n_tiles
    return expert, row_start, row_end


@triton.jit
def _gate_up_kernel(X, W_GATE, W_UP, PERM, OFFSETS, H_OUT,
                    DOUT, W_DOWN, TOPK_W, DG, DU, DW_PART,
                    H, I, E, K, stride_x, stride_dout, stride_dw_part,
                    BACKWARD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Sorted rows r of expert e, columns c of I: g = x_n Wg_e^T, u = x_n Wu_e^T (n = perm[r] // K),
    h = silu(g) * u -> H_OUT (M, I). BACKWARD also forms d = dout_n Wd_e in the same loop over H and stores
    dh = w d, DG = dh u silu'(g), DU = dh silu(g) (M, I) and DW_PART[perm[r], pid_n] = sum_c h d."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert, row_start, row_end = _find_tile(OFFSETS, pid_m, E, BLOCK_M)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    slots = tl.load(PERM + rows, mask=row_ok, other=0)
    tokens = (slots // K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    w_offset = expert.to(tl.int64) * I * H
    x_ptrs = X + tokens[:, None] * stride_x + ks[None, :]
    wg_ptrs = W_GATE + w_offset + cols[None, :] * H + ks[:, None]  # (BLOCK_K, BLOCK_N) of Wg_e^T
    wu_ptrs = W_UP + w_offset + cols[None, :] * H + ks[:, None]
    dout_ptrs = DOUT + tokens[:, None] * stride_dout + ks[None, :]
    wd_ptrs = W_DOWN + w_offset + ks[:, None] * I + cols[None, :]  # (BLOCK_K, BLOCK_N) of Wd_e
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = ks + k0 < H
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptrs, mask=a_mask, other=0.0)
        acc_g = _dot(x, tl.load(wg_ptrs, mask=b_mask, other=0.0), acc_g, UPCAST, PRECISION)
        acc_u = _dot(x, tl.load(wu_ptrs, mask=b_mask, other=0.0), acc_u, UPCAST, PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
        if BACKWARD:
            dout = tl.load(dout_ptrs, mask=a_mask, other=0.0)
            acc_d = _dot(dout, tl.load(wd_ptrs, mask=b_mask, other=0.0), acc_d, UPCAST, PRECISION)
            dout_ptrs += BLOCK_K
            wd_ptrs += BLOCK_K * I
    sig = tl.sigmoid(acc_g)
    silu_g = acc_g * sig
    h = (silu_g * acc_u).to(H_OUT.dtype.element_ty)
    out_offsets = rows.to(tl.int64)[:, None] * I + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(H_OUT + out_offsets, h, mask=out_mask)
    if BACKWARD:
        w = tl.load(TOPK_W + slots, mask=row_ok, other=0.0).to(tl.float32)
        dh = acc_d * w[:, None]
        tl.store(DG + out_offsets, (dh * acc_u * sig * (1.0 + acc_g * (1.0 - sig))).to(DG.dtype.element_ty),
                 mask=out_mask)
        tl.store(DU + out_offsets, (dh * silu_g).to(DU.dtype.element_ty), mask=out_mask)
        dw = tl.sum(h.to(tl.float32) * acc_d, axis=1)  # masked columns hold h = 0, d = 0
        tl.store(DW_PART + slots.to(tl.int64) * stride_dw_part + pid_n, dw, mask=row_ok)


@triton.jit
def _rows_to_slots_kernel(A1, B1, A2, B2, PERM, OFFSETS, OUT,
                          R, C, E, stride_a, stride_b_expert, stride_b_r, stride_b_c, stride_out,
                          TWO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[perm[r], c] = sum_j A1[r, j] B1[e, j, c] (+ A2[r, j] B2[e, j, c] when TWO), j < R, c < C, for the
    sorted rows r of expert e. B_i[e, j, c] lives at e * stride_b_expert + j * stride_b_r + c * stride_b_c."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    expert, row_start, row_end = _find_tile(OFFSETS, pid_m, E, BLOCK_M)
    if row_start >= row_end:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    ks = tl.arange(0, BLOCK_K)
    a_offsets = rows.to(tl.int64)[:, None] * stride_a + ks[None, :]
    b_offsets = expert.to(tl.int64) * stride_b_expert + ks[:, None] * stride_b_r + cols[None, :] * stride_b_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        k_ok = ks + k0 < R
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & col_ok[None, :]
        acc = _dot(tl.load(A1 + a_offsets, mask=a_mask, other=0.0), tl.load(B1 + b_offsets, mask=b_mask, other=0.0),
                   acc, UPCAST, PRECISION)
        if TWO:
            acc = _dot(tl.load(A2 + a_offsets, mask=a_mask, other=0.0), tl.load(B2 + b_offsets, mask=b_mask, other=0.0),
                       acc, UPCAST, PRECISION)
        a_offsets += BLOCK_K
        b_offsets += BLOCK_K * stride_b_r
    slots = tl.load(PERM + rows, mask=row_ok, other=0).to(tl.int64)
    tl.store(OUT + slots[:, None] * stride_out + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_kernel(A, B, PERM, TOPK_W, OFFSETS, DW, P, Q, K, stride_a, stride_b, stride_dw_expert,
                        A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DW[e, p, q] = sum over the sorted rows r of expert e of A'[r, p] B'[r, q], p < P, q < Q; DW[e] is (P, Q)
    contiguous. A' is A[r] or, with A_GATHER, TOPK_W[s] * A[s // K] for s = perm[r]; B' is B[r] or, with
    B_GATHER, B[s // K]. An expert without rows gets exact zeros. Grid: (P tiles * Q tiles, E)."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    n_q = tl.cdiv(Q, BLOCK_N)
    ps = (pid // n_q) * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = (pid % n_q) * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = ps < P
    q_ok = qs < Q
    lo = tl.load(OFFSETS + expert)
    hi = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_ok = rows < hi
        slots = tl.load(PERM + rows, mask=row_ok, other=0)
        a_rows = (slots // K if A_GATHER else rows).to(tl.int64)
        b_rows = (slots // K if B_GATHER else rows).to(tl.int64)
        a = tl.load(A + a_rows[:, None] * stride_a + ps[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        if A_GATHER:
            w = tl.load(TOPK_W + slots, mask=row_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * w[:, None]).to(A.dtype.element_ty)
        b = tl.load(B + b_rows[:, None] * stride_b + qs[None, :], mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        acc = _dot(tl.trans(a), b, acc, UPCAST, PRECISION)
    tl.store(DW + expert.to(tl.int64) * stride_dw_expert + ps[:, None] * Q + qs[None, :],
             acc.to(DW.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@triton.jit
def _combine_kernel(SLOTS, TOPK_W, OUT, C, K, stride_slots, stride_out,
                    WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[n, c] = sum_k (TOPK_W[n, k] if WEIGHTED else 1) * SLOTS[n*K + k, c], summed in float32."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < C
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(K):
        v = tl.load(SLOTS + (n * K + k) * stride_slots + cols, mask=ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            v = v * tl.load(TOPK_W + n * K + k).to(tl.float32)
        acc += v
    tl.store(OUT + n * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=ok)


def _route(topk_idx, E):
    """perm (M,) int32: slots sorted by expert (stable); offsets (E+1,) int32: expert e owns sorted rows
    offsets[e]:offsets[e+1]. Device ops only (no host sync)."""
    flat = topk_idx.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(E + 1, device=flat.device, dtype=sorted_ids.dtype))
    ids_in_range = (offsets[0] == 0) & (offsets[E] == flat.numel())  # no id < 0, none >= E
    message = f"kernels/moe.py moe_experts: topk_idx holds expert ids outside [0, {E})"
    if flat.is_cuda or torch.compiler.is_compiling():  # no host sync, no branch on a value (Dynamo cannot trace
        torch._assert_async(ids_in_range, message)       # one); with a message, so the compiler keeps it
    elif not ids_in_range:
        raise ValueError(message)
    return perm.to(torch.int32), offsets.to(torch.int32)


def _row_tiles(M, E, block_m):
    """Upper bound on the number of row tiles over all experts: sum_e cdiv(c_e, B) <= cdiv(M, B) + E."""
    return triton.cdiv(M, block_m) + E


def _gate_up(x, w_gate, w_up, perm, offsets, K, backward=None):
    """Launch _gate_up_kernel. backward = (dout, w_down, topk_weight) or None. Returns h, or (h, dg, du, dw)."""
    M, (E, I, H) = perm.numel(), w_gate.shape
    t = TILES["gate_up_backward" if backward else "gate_up"][x.element_size()]
    h = _empty((M, I), x.dtype, x.device)
    n_col_tiles = triton.cdiv(I, t.block_n)
    if backward:
        dout, w_down, topk_weight = backward
        dg, du = _empty((M, I), x.dtype, x.device), _empty((M, I), x.dtype, x.device)
        dw_part = _empty((M, n_col_tiles), torch.float32, x.device)
    else:
        dout, w_down, topk_weight, dg, du, dw_part = x, w_gate, perm, h, h, h
    grid = (n_col_tiles, _row_tiles(M, E, t.block_m))
    _gate_up_kernel[grid](x, w_gate, w_up, perm, offsets, h, dout, w_down, topk_weight, dg, du, dw_part,
                          H, I, E, K, x.stride(0), dout.stride(0), dw_part.stride(0),
                          BACKWARD=backward is not None, **_dot_flags(x.dtype),
                          BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                          num_warps=t.num_warps, num_stages=t.num_stages)
    return (h, dg, du, dw_part.sum(dim=1)) if backward else h


def _rows_to_slots(a1, b1, perm, offsets, out_cols, b_strides, a2=None, b2=None):
    """Launch _rows_to_slots_kernel: (M, out_cols) in slot order; b_strides = (expert, reduction, column)."""
    M, R = a1.shape
    E = b1.shape[0]
    t = TILES["rows_to_slots"][a1.element_size()]
    out = _empty((M, out_cols), a1.dtype, a1.device)
    grid = (triton.cdiv(out_cols, t.block_n), _row_tiles(M, E, t.block_m))
    _rows_to_slots_kernel[grid](a1, b1, a1 if a2 is None else a2, b1 if b2 is None else b2, perm, offsets, out,
                                R, out_cols, E, a1.stride(0), *b_strides, out.stride(0),
                                TWO=a2 is not None, **_dot_flags(a1.dtype),
                                BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                                num_warps=t.num_warps, num_stages=t.num_stages)
    return out


def _weight_grad(a, b, perm, topk_weight, offsets, E, K, a_gather, b_gather):
    """Launch _weight_grad_kernel: (E, P, Q) with P = a's width, Q = b's width."""
    P, Q = a.shape[1], b.shape[1]
    t = TILES["weight_grad"][a.element_size()]
    dw = _empty((E, P, Q), a.dtype, a.device)
    grid = (triton.cdiv(P, t.block_m) * triton.cdiv(Q, t.block_n), E)
    _weight_grad_kernel[grid](a, b, perm, topk_weight, offsets, dw, P, Q, K, a.stride(0), b.stride(0), P * Q,
                              A_GATHER=a_gather, B_GATHER=b_gather, **_dot_flags(a.dtype),
                              BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                              num_warps=t.num_warps, num_stages=t.num_stages)
    return dw


def _combine(slots, N, K, topk_weight=None):
    """Per token: sum over its K slot rows, weighted by topk_weight when given. (N*K, C) -> (N, C)."""
    C = slots.shape[1]
    out = _empty((N, C), slots.dtype, slots.device)
    block = combine_block(C)
    grid = (N, triton.cdiv(C, block))
    _combine_kernel[grid](slots, slots if topk_weight is None else topk_weight, out, C, K,
                          slots.stride(0), out.stride(0), WEIGHTED=topk_weight is not None, BLOCK=block)
    return out


class MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_gate, w_up, w_down):
        N, K = topk_idx.shape
        E, I, H = w_gate.shape
        perm, offsets = _route(topk_idx, E)
        h = _gate_up(x, w_gate, w_up, perm, offsets, K)
        y = _rows_to_slots(h, w_down, perm, offsets, H, (H * I, 1, I))  # y_s = h Wd_e^T: B[e, i, c] = Wd[e, c, i]
        ctx.save_for_backward(x, topk_weight, w_gate, w_up, w_down, perm, offsets)
        ctx.top_k = K
        return _combine(y, N, K, topk_weight)

    @staticmethod
    def backward(ctx, dout):
        x, topk_weight, w_gate, w_up, w_down, perm, offsets = ctx.saved_tensors
        N, H = x.shape
        E, I, _ = w_gate.shape
        K = ctx.top_k
        dout = dout.contiguous()
        h, dg, du, dw = _gate_up(x, w_gate, w_up, perm, offsets, K, backward=(dout, w_down, topk_weight))
        dx = d_gate = d_up = d_down = None
        if ctx.needs_input_grad[0]:  # dx_s = dg_s Wg_e + du_s Wu_e: B[e, i, c] = W[e, i, c]
            dx = _combine(_rows_to_slots(dg, w_gate, perm, offsets, H, (I * H, H, 1), du, w_up), N, K)
        if ctx.needs_input_grad[3]:
            d_gate = _weight_grad(dg, x, perm, topk_weight, offsets, E, K, a_gather=False, b_gather=True)
        if ctx.needs_input_grad[4]:
            d_up = _weight_grad(du, x, perm, topk_weight, offsets, E, K, a_gather=False, b_gather=True)
        if ctx.needs_input_grad[5]:
            d_down = _weight_grad(dout, h, perm, topk_weight, offsets, E, K, a_gather=True, b_gather=False)
        d_topk = dw.view(N, K).to(topk_weight.dtype) if ctx.needs_input_grad[2] else None
        return dx, None, d_topk, d_gate, d_up, d_down


def _check(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    where = "kernels/moe.py moe_experts"
    if x.dim() != 2 or topk_idx.dim() != 2 or topk_weight.shape != topk_idx.shape:
        raise ValueError(f"{where}: want x (N, H), topk_idx and topk_weight (N, K); got x {tuple(x.shape)}, "
                         f"topk_idx {tuple(topk_idx.shape)}, topk_weight {tuple(topk_weight.shape)}")
    N, H = x.shape
    E, I = w_gate.shape[:2] if w_gate.dim() == 3 else (-1, -1)
    if topk_idx.shape[0] != N or w_gate.shape != (E, I, H) or w_up.shape != (E, I, H) or w_down.shape != (E, H, I):
        raise ValueError(f"{where}: want topk_idx (N={N}, K), w_gate and w_up (E, I, H={H}), w_down (E, H, I); got "
                         f"topk_idx {tuple(topk_idx.shape)}, w_gate {tuple(w_gate.shape)}, "
                         f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: topk_idx must be int32 or int64, got {topk_idx.dtype}")
    if not topk_weight.is_floating_point():
        raise ValueError(f"{where}: topk_weight must be a float tensor, got {topk_weight.dtype}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{where}: {name} is {w.dtype} but x is {x.dtype} (outside autocast they must match)")
    devices = {t.device for t in (x, topk_idx, topk_weight, w_gate, w_up, w_down)}
    if len(devices) != 1:
        raise ValueError(f"{where}: all arguments must be on one device, got {sorted(map(str, devices))}")


def moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """Weighted sum of the chosen SwiGLU experts (kernels.reference.moe_experts), differentiable in x,
    topk_weight and the three expert weights. Under autocast, x and the weights run in the autocast dtype
    (as F.linear would) and the result comes back in x's dtype."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        low = torch.get_autocast_dtype(x.device.type)
        x, w_gate, w_up, w_down = (t.to(low) for t in (x, w_gate, w_up, w_down))
    _check(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    args = (x.contiguous(), topk_idx, topk_weight.contiguous(), w_gate.contiguous(), w_up.contiguous(),
            w_down.contiguous())
    return MoEExperts.apply(*args).to(dtype)


def _expert_rows(args):
    """Rows per expert of a launch: args["expert_rows"] when given (the step model has no routing data and
    assumes it), else read from OFFSETS."""
    if "expert_rows" in args:
        return list(args["expert_rows"])
    offsets = args["OFFSETS"].tolist()
    return [hi - lo for lo, hi in zip(offsets, offsets[1:])]


def traffic(kernel, grid, args):
    """Bytes one launch of `kernel` (a kernel of this file) reads and writes, per pointer argument:
    {name: (read, written)}, each distinct byte its tl.load / tl.store touch counted once: a GEMM operand re-read by
    several tiles counts once (the L2-ideal traffic), a token row gathered for each of its K slots counts once.
    The rows per expert come from OFFSETS (or args["expert_rows"]). bench/launches.py uses it;
    tests/test_traffic.py checks it."""
    def size(name, n):
        return n * args[name].element_size()
    if kernel == "_combine_kernel":
        N, K, C = grid[0], args["K"], args["C"]
        return {"SLOTS": (size("SLOTS", N * K * C), 0), "TOPK_W": (size("TOPK_W", N * K) if args["WEIGHTED"] else 0, 0),
                "OUT": (0, size("OUT", N * C))}
    rows = _expert_rows(args)
    M, E, used = sum(rows), len(rows), sum(r > 0 for r in rows)
    N = M // args["K"] if "K" in args else None
    common = {"PERM": (size("PERM", M), 0), "OFFSETS": (size("OFFSETS", E + 1), 0)}
    if kernel == "_gate_up_kernel":
        H, I, back = args["H"], args["I"], args["BACKWARD"]
        out = {**common, "X": (size("X", N * H), 0), "W_GATE": (size("W_GATE", used * I * H), 0),
               "W_UP": (size("W_UP", used * I * H), 0), "H_OUT": (0, size("H_OUT", M * I))}
        if back:
            out.update(DOUT=(size("DOUT", N * H), 0), W_DOWN=(size("W_DOWN", used * H * I), 0),
                       TOPK_W=(size("TOPK_W", M), 0), DG=(0, size("DG", M * I)), DU=(0, size("DU", M * I)),
                       DW_PART=(0, size("DW_PART", M * grid[0])))
        return out
    if kernel == "_rows_to_slots_kernel":
        R, C = args["R"], args["C"]
        out = {**common, "A1": (size("A1", M * R), 0), "B1": (size("B1", used * R * C), 0),
               "OUT": (0, size("OUT", M * C))}
        if args["TWO"]:
            out.update(A2=(size("A2", M * R), 0), B2=(size("B2", used * R * C), 0))
        return out
    if kernel == "_weight_grad_kernel":
        P, Q = args["P"], args["Q"]
        a_rows, b_rows = (N if args["A_GATHER"] else M), (N if args["B_GATHER"] else M)
        return {**common, "A": (size("A", a_rows * P) if M else 0, 0), "B": (size("B", b_rows * Q) if M else 0, 0),
                "TOPK_W": (size("TOPK_W", M) if args["A_GATHER"] else 0, 0), "DW": (0, size("DW", E * P * Q))}
    return None


def flops(kernel, grid, args):
    """Multiply-add FLOPs (2 per product) of one launch of a grouped GEMM of this file; 0 for the others."""
    if kernel not in ("_gate_up_kernel", "_rows_to_slots_kernel", "_weight_grad_kernel"):
        return 0
    M = sum(_expert_rows(args))
    if kernel == "_gate_up_kernel":
        return 2 * M * args["I"] * args["H"] * (3 if args["BACKWARD"] else 2)
    if kernel == "_rows_to_slots_kernel":
        return 2 * M * args["R"] * args["C"] * (2 if args["TWO"] else 1)
    return 2 * M * args["P"] * args["Q"]
