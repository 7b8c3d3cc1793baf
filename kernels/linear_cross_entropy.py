"""Fused linear cross-entropy and linear log-probabilities: the loss from the final hidden states and the (tied)
lm_head weight, without ever holding the full tokens x vocab logits.

    logits_i = hidden_i @ weight.T                       hidden (N, H), weight (V, H), labels (N,)
    lse_i    = log sum_j exp(logits_ij)                  in float32, online over vocab blocks
    raw_i    = lse_i - logits_i[labels_i] + z * lse_i^2  0 where labels_i == ignore_index
    linear_cross_entropy: l_i = w_i * raw_i; "none" -> l, "sum" -> sum l_i, "mean" -> sum l_i / sum_valid w_i
                          (w_i scales the z term too, unlike Liger's; see kernels/reference.py)
    linear_logprobs:      -raw_i (with z = 0)
    d raw_i / d logits_ij = (1 + 2 z lse_i) * softmax_ij - [j == labels_i]

The tokens are processed in chunks whose logits stay under MAX_CHUNK_LOGITS_BYTES. Per chunk: logits = h_c @ W.T
(a cuBLAS GEMM, in the autocast dtype when autocast is on), then one Triton kernel computes raw_i and, when a
gradient is wanted, overwrites the logits in place with c_i * d raw_i / d logits_i, where c_i is the row's
coefficient; then grad_h_c = dlogits @ W and grad_W += dlogits.T @ h_c (accumulated in float32).

For the scalar reductions every c_i is known in the forward (w_i or w_i / sum w), so the forward computes both
gradients and the backward only scales them by grad_output: no logits are kept or recomputed. For the per-token
outputs (reduction "none", linear_logprobs) c_i depends on grad_output, so the backward recomputes each chunk's logits.
The coefficients are divided by their largest magnitude before the kernel and the factor is applied to the float32
results, so the low-precision dlogits are O(1) numbers (fp16 would flush c_i * softmax_ij ~ 1e-8 to zero).
"""
import os

import torch
import triton
import triton.language as tl

MAX_CHUNK_LOGITS_BYTES = 32 << 20  # one chunk's logits (rows x vocab in the matmul dtype) stay under this


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, stride_row, labels_ptr, coef_ptr, loss_ptr,
                               n_rows, n_vocab, ignore_index, z_loss,
                               WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """BLOCK_R rows per program. loss[r] = raw_r (fp32, 0 if ignored); with WRITE_GRAD, logits[r, :] is
    overwritten by coef[r] * ((1 + 2 z lse_r) * softmax(logits[r]) - onehot(labels[r])) (0 if ignored)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = tl.minimum(rows, n_rows - 1)  # rows past the end redo the last row and store nothing
    row_ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_row  # (BLOCK_R, 1)
    labels = tl.load(labels_ptr + rows)
    valid = labels != ignore_index
    target = tl.where(valid, labels, 0)
    cols0 = tl.arange(0, BLOCK_V)[None, :]

    # pass 1: online log-sum-exp over the vocab, in fp32
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + cols0
        x = tl.load(row_ptrs + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(s)
    x_target = tl.load(logits_ptr + rows.to(tl.int64) * stride_row + target).to(tl.float32)
    raw = lse - x_target + z_loss * lse * lse
    tl.store(loss_ptr + rows, tl.where(valid, raw, 0.0), mask=row_ok)

    # pass 2: the scaled gradient of raw, written over the logits
    if WRITE_GRAD:
        coef = tl.where(valid, tl.load(coef_ptr + rows), 0.0)
        softmax_coef = coef * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + cols0
            mask = row_ok[:, None] & (cols < n_vocab)
            x = tl.load(row_ptrs + cols, mask=mask, other=0.0).to(tl.float32)
            grad = softmax_coef[:, None] * tl.exp(x - lse[:, None])
            grad = grad - tl.where(cols == target[:, None], coef[:, None], 0.0)
            tl.store(row_ptrs + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_config(n_vocab, tile=None):
    """(BLOCK_R, BLOCK_V, num_warps) for rows of n_vocab logits. A program handles a tile of up to `tile` logits:
    8192 on a GPU (16 per thread, about 40 registers, no spills), 64K under the interpreter, where each program
    costs Python overhead. Not sized from the row count, which torch.compile makes symbolic when batch shapes vary
    (see kernels/aot.py); a chunk of fewer rows masks the rest."""
    tile = tile or (1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 8192)
    block_v = min(triton.next_power_of_2(n_vocab), 8192)
    block_r = max(1, tile // block_v)
    return block_r, block_v, max(4, min(16, block_r * block_v // 512))


def _empty(shape, dtype, device):
    """Every output buffer the kernels fill comes from here (the tests poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _cross_entropy_rows(logits, labels, loss, ignore_index, z_loss, coef=None):
    """Writes the per-row raw loss of logits (n, V) into loss (n,) fp32; with coef (n,) fp32, also overwrites the
    logits by the gradient."""
    n, V = logits.shape
    block_r, block_v, num_warps = cross_entropy_config(V)
    _cross_entropy_rows_kernel[(triton.cdiv(n, block_r),)](
        logits, logits.stride(0), labels, loss if coef is None else coef, loss, n, V, ignore_index, float(z_loss),
        WRITE_GRAD=coef is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=num_warps)


def _chunk_rows(n_rows, n_vocab, dtype):
    """Rows per chunk: as many as fit MAX_CHUNK_LOGITS_BYTES, spread evenly over the chunks."""
    per_row = n_vocab * torch.finfo(dtype).bits // 8
    n_chunks = triton.cdiv(n_rows, max(1, MAX_CHUNK_LOGITS_BYTES // per_row))
    return max(1, triton.cdiv(n_rows, max(1, n_chunks)))


def _chunked(hidden, weight, labels, ignore_index, z_loss, dtype, coef=None, grad_hidden=False, grad_weight=False):
    """One pass over the tokens in chunks, matmuls in `dtype`.

    Returns raw (N,) fp32 and, with coef (N,) fp32, grad_h = dlogits @ W (N, H) in `dtype` and
    grad_W = dlogits.T @ h (V, H) in fp32, where dlogits_i = coef_i * d raw_i / d logits_i (None when not asked for).
    """
    N, V = hidden.shape[0], weight.shape[0]
    w = weight.to(dtype)
    write_grad = coef is not None and (grad_hidden or grad_weight)
    rows = _chunk_rows(N, V, dtype)
    buf = _empty((min(rows, N), V), dtype, hidden.device)
    raw = _empty((N,), torch.float32, hidden.device)
    grad_h = _empty(hidden.shape, dtype, hidden.device) if write_grad and grad_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if write_grad and grad_weight \
        else None
    for start in range(0, N, rows):
        end = min(start + rows, N)
        h = hidden[start:end].to(dtype)
        logits = torch.mm(h, w.t(), out=buf[:end - start])
        _cross_entropy_rows(logits, labels[start:end], raw[start:end], ignore_index, z_loss,
                            coef[start:end] if write_grad else None)
        if grad_h is not None:
            torch.mm(logits, w, out=grad_h[start:end])
        if grad_w is not None:
            grad_w += torch.mm(logits.t(), h)
    return raw, grad_h, grad_w


def _unit_scale(coef, valid):
    """coef / s and s (0-dim fp32), s = the largest |coef| over valid rows (1 if none is non-zero)."""
    s = torch.where(valid, coef.abs(), 0.0).amax() if coef.numel() else coef.new_ones(())
    s = torch.where(s > 0, s, 1.0)
    return coef / s, s


def _scaled(grad, factor, dtype):
    return None if grad is None else (grad.float() * factor).to(dtype)


class _SummedLinearCrossEntropy(torch.autograd.Function):
    """loss = norm * sum_i w_i * raw_i (norm = 1 or 1 / sum w). Both gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_w, norm, ignore_index, z_loss, dtype, want_grad):
        with torch.autocast(hidden.device.type, enabled=False):
            need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
            coef, scale = _unit_scale(token_w, labels != ignore_index)
            raw, ctx.grad_h, ctx.grad_w = _chunked(hidden, weight, labels, ignore_index, z_loss, dtype,
                                                   coef if need_h or need_w else None, need_h, need_w)
            ctx.scale = scale * norm
            ctx.dtypes = hidden.dtype, weight.dtype
            return (raw * token_w).sum() * norm

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        factor = ctx.scale * grad_out.float()
        return (_scaled(ctx.grad_h, factor, ctx.dtypes[0]), _scaled(ctx.grad_w, factor, ctx.dtypes[1]),
                None, None, None, None, None, None, None)


class _TokenLinearCrossEntropy(torch.autograd.Function):
    """out_i = a_i * raw_i per token (a = w for reduction "none", a = -1 for log-probabilities). The backward
    recomputes each chunk's logits with coefficients c_i = a_i * grad_out_i."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_a, ignore_index, z_loss, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            raw, _, _ = _chunked(hidden, weight, labels, ignore_index, z_loss, dtype)
        ctx.save_for_backward(hidden, weight, labels, token_a)
        ctx.ignore_index, ctx.z_loss, ctx.dtype = ignore_index, z_loss, dtype
        return raw * token_a

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, labels, token_a = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            coef, scale = _unit_scale(token_a * grad_out.float(), labels != ctx.ignore_index)
            _, grad_h, grad_w = _chunked(hidden, weight, labels, ctx.ignore_index, ctx.z_loss, ctx.dtype, coef,
                                         need_h, need_w)
            return (_scaled(grad_h, scale, hidden.dtype), _scaled(grad_w, scale, weight.dtype),
                    None, None, None, None, None)


def _check(hidden, weight, labels, token_weights=None):
    """Validate shapes, dtypes and label range; returns the matmul dtype (the autocast dtype when autocast is on)."""
    where = "kernels/linear_cross_entropy.py"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden must be (N, H) and weight (V, H), got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{where}: labels must be an integer tensor of shape ({hidden.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if token_weights is not None and token_weights.shape != hidden.shape[:1]:
        raise ValueError(f"{where}: token_weights must have shape ({hidden.shape[0]},), got "
                         f"{tuple(token_weights.shape)}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"{where}: hidden, weight and labels must be on one device, got {hidden.device}, "
                         f"{weight.device}, {labels.device}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{where}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one of them or "
                         f"run under torch.autocast (as F.linear would require)")
    return hidden.dtype


def _check_labels(labels, ignore_index, n_vocab):
    """A label outside [0, V) would make the kernel read outside the logits. On CUDA (and under torch.compile,
    which cannot branch on a tensor's value) the check is a device-side assertion, as the reference's gather, so
    the training step does not wait for the GPU here."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    message = f"kernels/linear_cross_entropy.py: labels must be in [0, {n_vocab}) or ignore_index ({ignore_index})"
    if labels.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(f"{message}; found {labels[bad][:5].tolist()}")


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, token_weights=None, reduction="mean",
                         z_loss=0.0):
    """Cross-entropy of hidden @ weight.T against labels in float32, as kernels.reference.linear_cross_entropy.

    hidden (N, H), weight (V, H), labels (N,) int, token_weights (N,) or None (constants: no gradient).
    reduction "none" -> (N,), "sum" / "mean" -> scalar (mean over the weight of the non-ignored tokens, 0 if none).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dtype = _check(hidden, weight, labels, token_weights)
    labels = labels.contiguous()
    _check_labels(labels, ignore_index, weight.shape[0])
    valid = labels != ignore_index
    token_w = valid.float() if token_weights is None else token_weights.float() * valid
    if reduction == "none":
        return _TokenLinearCrossEntropy.apply(hidden, weight, labels, token_w, ignore_index, z_loss, dtype)
    norm = torch.ones((), dtype=torch.float32, device=hidden.device)
    if reduction == "mean":
        denom = token_w.sum()
        norm = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), 0.0)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _SummedLinearCrossEntropy.apply(hidden, weight, labels, token_w, norm, ignore_index, z_loss, dtype,
                                           want_grad)


def linear_logprobs(hidden, weight, labels, ignore_index=-100):
    """log softmax(hidden @ weight.T)[labels] per token, (N,) float32, 0 where labels == ignore_index."""
    dtype = _check(hidden, weight, labels)
    labels = labels.contiguous()
    _check_labels(labels, ignore_index, weight.shape[0])
    minus_one = torch.full(labels.shape, -1.0, dtype=torch.float32, device=hidden.device)
    return _TokenLinearCrossEntropy.apply(hidden, weight, labels, minus_one, ignore_index, 0.0, dtype)


def traffic(kernel, grid, args):
    """Bytes one launch of `kernel` (a kernel of this file) reads and writes, per pointer argument:
    {name: (read, written)}, each distinct byte its tl.load / tl.store touch counted once (the second pass over a
    row of logits re-reads what the first just read). bench/launches.py uses it; tests/test_traffic.py checks it."""
    if kernel != "_cross_entropy_rows_kernel":
        return None
    rows, vocab, grad = args["n_rows"], args["n_vocab"], args["WRITE_GRAD"]
    logits = rows * vocab * args["logits_ptr"].element_size()
    return {"logits_ptr": (logits, logits if grad else 0), "labels_ptr": (rows * args["labels_ptr"].element_size(), 0),
            "coef_ptr": (rows * args["coef_ptr"].element_size() if grad else 0, 0),
            "loss_ptr": (0, rows * args["loss_ptr"].element_size())}
