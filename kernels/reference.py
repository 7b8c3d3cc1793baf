"""The pure-PyTorch reference ops: the definition of what every kernel must compute.

The `torch` backend is exactly these functions; the parity tests compare the `triton` (and `liger`) backends with
them. They are written to be obviously right, not fast: math in float32, output in the input's dtype.

Shapes: N tokens, H hidden, V vocab, B batch, T sequence, D head dim, E experts, I expert width, K experts per token.
"""
import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps=1e-5):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim. x (..., H), weight (H,) -> (..., H) in x.dtype."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def add_rms_norm(x, residual, weight, eps=1e-5):
    """h = x + residual; y = rms_norm(h). Returns (h, y), both in the promoted dtype of x and residual (h is
    rounded to it first). Under autocast the residual stream stays float32 while sublayer outputs are bf16, as
    in MiniMind2, where `residual + attn_out` promotes to float32."""
    dtype = torch.promote_types(x.dtype, residual.dtype)
    h = (x.float() + residual.float()).to(dtype)
    return h, rms_norm(h, weight, eps)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q, k, cos, sin, offset=0):
    """Rotary embedding in the rotate-half layout: x * cos + rotate_half(x) * sin.

    q (B, T, Hq, D), k (B, T, Hkv, D); cos, sin (>= offset + T, D) with each half repeated twice.
    Rows offset .. offset + T of cos/sin are used (offset = number of cached positions when decoding).
    """
    if q.shape[-1] % 2 or k.shape[-1] % 2:
        raise ValueError(f"kernels/reference.py: rope needs an even head dim, got {q.shape[-1]} (q), "
                         f"{k.shape[-1]} (k)")
    T = q.shape[1]
    c = cos[offset:offset + T].float()[None, :, None, :]
    s = sin[offset:offset + T].float()[None, :, None, :]
    rq = q.float() * c + rotate_half(q.float()) * s
    rk = k.float() * c + rotate_half(k.float()) * s
    return rq.to(q.dtype), rk.to(k.dtype)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, offset=0, eps=1e-6):
    """minimind-3's q/k norm then RoPE: rope(rms_norm(q, q_weight), rms_norm(k, k_weight)), the norm over the
    head dim D with one weight (D,) shared by all heads of q (of k). Float32 throughout, one rounding at the end.

    q (B, T, Hq, D), k (B, T, Hkv, D); cos, sin as in `rope`. Returns (q, k) in their dtypes.
    """
    qn, kn = rms_norm(q.float(), q_weight, eps), rms_norm(k.float(), k_weight, eps)
    rq, rk = rope(qn, kn, cos, sin, offset)
    return rq.to(q.dtype), rk.to(k.dtype)


def swiglu(gate, up):
    """silu(gate) * up, elementwise, in float32, returned in gate.dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def _token_losses(hidden, weight, labels, ignore_index, z_loss):
    """Per-token loss lse - logit[label] (+ z_loss * lse^2) and the validity mask. Materialises (N, V) logits."""
    logits = F.linear(hidden, weight).float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    loss = lse - target
    if z_loss:
        loss = loss + z_loss * lse.pow(2)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, token_weights=None, reduction="mean",
                         z_loss=0.0):
    """Cross-entropy of logits = hidden @ weight.T against labels, in float32.

    hidden (N, H), weight (V, H), labels (N,) int; token_weights (N,) or None.
    per-token loss l_i = w_i * (logsumexp(logits_i) - logits_i[labels_i] + z_loss * logsumexp(logits_i)^2),
    0 where labels_i == ignore_index. reduction: "none" -> (N,), "sum" -> sum l_i,
    "mean" -> sum l_i / sum w_i over non-ignored tokens (0 if there are none).
    The token weight scales the z-loss term too (Liger's fused cross-entropy leaves its lse^2 term unweighted): a
    token that counts double in the loss counts double in the logit-size penalty.
    """
    loss, valid = _token_losses(hidden, weight, labels, ignore_index, z_loss)
    w = valid.float() if token_weights is None else token_weights.float() * valid
    loss = loss * w
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        denom = w.sum()
        return torch.where(denom > 0, loss.sum() / denom.clamp_min(1e-30), loss.sum() * 0)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def linear_logprobs(hidden, weight, labels, ignore_index=-100):
    """log softmax(hidden @ weight.T)[labels] per token: (N,) float32, 0 where labels == ignore_index."""
    loss, _ = _token_losses(hidden, weight, labels, ignore_index, 0.0)
    return -loss


def moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """Weighted sum of the chosen SwiGLU experts, the way MiniMind2 trains: one expert at a time.

    x (N, H); topk_idx (N, K) int; topk_weight (N, K); w_gate, w_up (E, I, H); w_down (E, H, I).
    y_n = sum_k topk_weight[n, k] * expert_{topk_idx[n, k]}(x_n), expert_e(x) = (silu(x Wg_e^T) * x Wu_e^T) Wd_e^T.
    Returns (N, H) in x.dtype. Dropless: every token reaches all K of its experts.
    """
    N, K = topk_idx.shape
    xk = x.repeat_interleave(K, dim=0)  # (N*K, H): row n*K + k is token n's k-th choice
    flat_idx = topk_idx.reshape(-1)
    y = torch.zeros(N * K, x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w_gate.shape[0]):
        rows = flat_idx == e
        xe = xk[rows]
        h = F.silu(F.linear(xe, w_gate[e]).float()) * F.linear(xe, w_up[e]).float()
        y[rows] = F.linear(h.to(xe.dtype), w_down[e]).float()
    y = (y.view(N, K, -1) * topk_weight.float().unsqueeze(-1)).sum(dim=1)
    return y.to(x.dtype)
