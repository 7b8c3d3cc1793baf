"""The loss math of the preference and distillation stages (DPO, white-box distillation), in one place.

DPO (Rafailov et al. 2023), MiniMind2's variant: a sequence's log-probability is the MEAN of its token
log-probabilities over the assistant tokens (not the sum), and

    loss = -log sigmoid(beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)))

averaged over the batch. At the start (policy == reference) every pair gives log 2.

Distillation, MiniMind's convention (`train_distillation.py`: total = alpha * CE + (1 - alpha) * KL):

    CE = mean over assistant tokens of -log softmax(z)[y]
    KL = T^2 * mean over assistant tokens of sum_v p_t(v) (log p_t(v) - log q(v)),
         p_t = softmax(u / T) (teacher), q = softmax(z / T) (student)
    loss = alpha * CE + (1 - alpha) * KL

with z = h_s W_s^T the student's logits and u = h_t W_t^T the teacher's. `chunked_distill_loss` computes it over
blocks of tokens from the final hidden states, so neither model's full-vocabulary logits for the whole batch
exist at once: per block it builds both logit blocks in fp32, the loss terms and the gradient of the loss with
respect to the student's logits,

    dL/dz = [alpha (softmax(z) - onehot(y)) + (1 - alpha) T (softmax(z / T) - p_t)] / n_tokens,

then folds it into dL/dh_s = dL/dz W_s and dL/dW_s += dL/dz^T h_s and drops the block. Backward only scales
the stored gradients by the incoming one, so nothing is recomputed.
"""
import torch
import torch.nn.functional as F

from minimind.model import shift_labels


# ----------------------------------------------------------------------------------------------------------- DPO
def assistant_mask(labels, ignore_index=-100):
    """(B, T) float 1 where token_logprobs has a real log-probability: labels != ignore, never position 0
    (token_logprobs puts 0 there: nothing predicts the first token)."""
    mask = (labels != ignore_index).float()
    mask[:, 0] = 0
    return mask


def sequence_logprobs(token_logprobs, labels, ignore_index=-100):
    """Mean token log-probability per sequence over the assistant tokens: (B, T) -> (B,). A row without any
    assistant token gives 0."""
    mask = assistant_mask(labels, ignore_index)
    return (token_logprobs * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """All (B,) sequence log-probabilities. Returns (loss scalar, stats dict of detached scalars):
    reward_chosen / reward_rejected = beta * (policy - reference) averaged, accuracy = share of pairs whose
    chosen reward exceeds the rejected one, margin = mean of their difference."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    with torch.no_grad():
        r_c, r_r = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
        stats = {"reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                 "accuracy": (r_c > r_r).float().mean(), "margin": (r_c - r_r).mean()}
    return loss, stats


def dpo_batch_logprobs(model, batch):
    """Policy (or reference) per-sequence log-probabilities for a DPO batch in one forward: chosen and rejected
    rows are stacked (2B, T), right-padded, so causal attention needs no mask (see train.pretrain.lm_loss).
    Returns (chosen (B,), rejected (B,), aux loss)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    lp, aux = model.token_logprobs(ids, labels)
    seq = sequence_logprobs(lp.float(), labels)
    B = batch["chosen_input_ids"].shape[0]
    return seq[:B], seq[B:], aux


# -------------------------------------------------------------------------------------------------- distillation
class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, temperature, alpha, chunk_size):
        n, T = h_s.shape[0], temperature
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            ws, wt = w_s.float(), w_t.float()
            grad_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device)
            grad_w = torch.zeros_like(ws)
            ce_sum = h_s.new_zeros((), dtype=torch.float32)
            kl_sum = h_s.new_zeros((), dtype=torch.float32)
            for start in range(0, n, chunk_size):
                rows = slice(start, min(start + chunk_size, n))
                hs, y = h_s[rows].float(), targets[rows]
                z = hs @ ws.T  # (c, V) student logits
                log_p = z.log_softmax(dim=-1)
                ce_sum += -log_p.gather(1, y[:, None]).sum()
                grad_z = log_p.exp_().mul_(alpha)  # alpha * softmax(z)
                grad_z[torch.arange(z.shape[0], device=z.device), y] -= alpha
                del log_p
                if alpha < 1:
                    log_q = (z / T).log_softmax(dim=-1)
                    log_pt = ((h_t[rows].float() @ wt.T) / T).log_softmax(dim=-1)
                    p_t = log_pt.exp()
                    kl_sum += (p_t * (log_pt - log_q)).sum()
                    grad_z += (1 - alpha) * T * (log_q.exp_() - p_t)
                    del log_q, log_pt, p_t
                grad_z /= n
                grad_h[rows] = grad_z @ ws
                grad_w.addmm_(grad_z.T, hs)
                del z, grad_z
            ce, kl = ce_sum / n, kl_sum * (T * T) / n
            loss = alpha * ce + (1 - alpha) * kl
        ctx.save_for_backward(grad_h.to(h_s.dtype), grad_w.to(w_s.dtype))
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None, None


def chunked_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                         temperature=1.0, alpha=0.5, chunk_size=2048, ignore_index=-100):
    """White-box distillation loss from final hidden states (see the module docstring).

    student_hidden (B, T, Hs) (requires grad), student_weight (V, Hs) (the student's lm_head weight),
    teacher_hidden (B, T, Ht) and teacher_weight (V, Ht) (no grad), labels (B, T) aligned with input_ids,
    -100 where no loss (shifted here). Returns (loss, ce, kl): loss differentiable w.r.t. the student's hidden
    states and weight, ce and kl detached. No assistant token at all gives zeros.
    """
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"teacher vocab {teacher_weight.shape[0]} != student vocab {student_weight.shape[0]}: "
                         "distillation needs the same tokenizer")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or student_hidden.shape[:2] != labels.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_hidden.shape)}, teacher "
                         f"{tuple(teacher_hidden.shape)}, labels {tuple(labels.shape)}")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got alpha={alpha}, temperature={temperature}")
    targets = shift_labels(labels, ignore_index).reshape(-1)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, keep)
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep).detach()
    if keep.numel() == 0:
        zero = (student_hidden.sum() + student_weight.sum()) * 0.0
        return zero.float(), zero.detach().float(), zero.detach().float()
    return _ChunkedDistill.apply(h_s, student_weight, h_t, teacher_weight.detach(), targets[keep],
                                 float(temperature), float(alpha), int(chunk_size))


def full_logits_distill_loss(student_logits, teacher_logits, labels, temperature=1.0, alpha=0.5, ignore_index=-100):
    """The same loss from full (B, T, V) logits with plain autograd, as MiniMind computes it. A reference for
    tests and small runs; holds every logit in memory."""
    targets = shift_labels(labels, ignore_index).reshape(-1)
    keep = targets != ignore_index
    z = student_logits.reshape(-1, student_logits.shape[-1])[keep].float()
    u = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep].float()
    ce = F.cross_entropy(z, targets[keep])
    kl = F.kl_div((z / temperature).log_softmax(-1), (u / temperature).softmax(-1), reduction="batchmean")
    kl = kl * temperature ** 2
    return alpha * ce + (1 - alpha) * kl, ce.detach(), kl.detach()
