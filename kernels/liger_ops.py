"""The `liger` backend: liger-kernel's Triton ops behind this project's op signatures (a peer to compare with).

Layouts and semantics are adapted to kernels/reference.py:
- rms_norm / add_rms_norm: liger's "gemma" casting mode (everything in float32, cast back at the end), which is the
  reference's math; add_rms_norm uses liger's fused add + norm, which returns (y, h): swapped here to (h, y).
- rope: liger wants q (B, H, T, D) and cos/sin (T, D); ours are (B, T, H, D), so it gets transposed views (its kernel
  works on the same (B, T, H, D) storage). Liger rotates q and k in place (as in its Hugging Face use): the model
  never reads the unrotated q/k again.
- qk_norm_rope: liger has no fused q/k norm + RoPE; its rms_norm (over the head dim, all heads at once, the same
  "gemma" casting) and then its rope, two launches. The normalised q/k are rounded to the input dtype in between
  (the reference rounds once, at the end).
- linear_cross_entropy: liger's fused linear cross-entropy with reduction "sum" or "none"; the reference's mean (over
  non-ignored tokens, weighted by per-token weights, 0 when every label is ignored) is taken here, because liger's
  `ce_weight` weights classes, not tokens. z_loss is liger's lse_square_scale (z_loss * lse^2 per token).
- linear_logprobs: minus liger's per-token cross-entropy (reduction "none"), which is log softmax at the label.
liger-kernel has no MoE experts op in this form: moe_experts is absent, and backend.py turns that into a
NotImplementedError naming it.
"""
import torch
from liger_kernel.transformers.functional import (liger_fused_add_rms_norm, liger_fused_linear_cross_entropy,
                                                  liger_rms_norm, liger_rope, liger_swiglu)


def rms_norm(x, weight, eps=1e-5):
    return liger_rms_norm(x, weight, eps, offset=0.0, casting_mode="gemma", in_place=False)


def add_rms_norm(x, residual, weight, eps=1e-5):
    dtype = torch.promote_types(x.dtype, residual.dtype)  # the reference's h dtype (fp32 residual stream)
    y, h = liger_fused_add_rms_norm(x.to(dtype), residual.to(dtype), weight, eps, offset=0.0, casting_mode="gemma",
                                    in_place=False)
    return h, y


def rope(q, k, cos, sin, offset=0):
    T = q.shape[1]  # tables as (1, T, D), broadcast over the batch: the form every liger version takes
    cos, sin = cos[None, offset:offset + T], sin[None, offset:offset + T]
    qo, ko = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qo.transpose(1, 2), ko.transpose(1, 2)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, offset=0, eps=1e-6):
    return rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin, offset)


def swiglu(gate, up):
    return liger_swiglu(gate, up)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, token_weights=None, reduction="mean",
                         z_loss=0.0):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    valid = labels != ignore_index
    if token_weights is None and reduction == "sum":
        return liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                                lse_square_scale=z_loss, reduction="sum").float()
    w = valid.float() if token_weights is None else token_weights.float() * valid
    if token_weights is None and reduction == "mean":
        loss_sum = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                                    lse_square_scale=z_loss, reduction="sum").float()
    else:
        per_token = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                                     lse_square_scale=z_loss, reduction="none").float() * w
        if reduction == "none":
            return per_token
        loss_sum = per_token.sum()
        if reduction == "sum":
            return loss_sum
    denom = w.sum()
    return torch.where(denom > 0, loss_sum / denom.clamp_min(1e-30), loss_sum * 0)


def linear_logprobs(hidden, weight, labels, ignore_index=-100):
    return -liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index,
                                             reduction="none").float()
