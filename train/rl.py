"""What the RL stages share (train/grpo.py, train/ppo.py): their rollout flags and preparation, the rollout of a
prompt batch, and the loss math.

Notation: N rows (B prompts x G samples, row p * G + g), L completion tokens per row (right-padded), mask m (N, L)
1 on the sampled tokens through the first <|im_end|>. Log-probs are at temperature 1: pi (the policy being
trained), old (the policy that sampled, from the rollout's own pass), ref (the frozen reference).

GRPO / CISPO (MiniMind's train_grpo.py):

    A_i = (r_i - mean_g r) / (std_g r + 1e-4)                 over the G samples of one prompt (population std)
    kl_t = exp(ref_t - pi_t) - (ref_t - pi_t) - 1              k3 estimate of KL(pi || ref), >= 0 per token
    ratio_t = exp(pi_t - old_t)
    cispo:  l_t = -(sg(min(ratio_t, eps_high)) * A_i * pi_t - beta * kl_t)          sg = stop gradient
    grpo:   l_t = -(min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i) - beta * kl_t)
    loss = mean over rows of (sum_t m_t l_t / max(1, sum_t m_t))

PPO (MiniMind's train_ppo.py), the reward r_i of a row given at its last token, V_t the critic's value of the state
before token t:

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}      (GAE; V, r, A are 0 past the end)
    R_t = A_t + V_t (returns);  A whitened over the rollout's tokens: (A - mean) / sqrt(var + 1e-8)
    policy = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)) + kl_coef * mean_t kl_t
    value  = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)
    approx_kl = 0.5 * mean_t (pi_t - old_t)^2           (mean_t: over the masked tokens of the mini-batch)

Every log-prob comes from `completion_logprobs`: one forward of the sequences, then `ops.linear_logprobs` on the
hidden states that predict a completion token, so neither the (N, T, V) logits nor the prompt positions' head
matmul ever exist.
"""
import copy
import time
from pathlib import Path

import numpy as np
import torch

from minimind.generate import SamplingConfig, rollout
from train import engine
from train.rewards import Rewards, parse_spec

IGNORE = -100
# MiniMind's train_grpo.py / train_ppo.py defaults (--max_seq_len is the prompt's)
DEFAULTS = dict(epochs=1, batch_size=2, learning_rate=3e-7, accumulation_steps=1, max_seq_len=768, log_interval=1,
                save_interval=10, from_weight="full_sft", data_path="dataset/rlaif.jsonl")
# minimind-3's GRPO / PPO recipe: the same values (MiniMind's RL trainers are minimind-3's)
MINIMIND3_DEFAULTS = dict(epochs=1, batch_size=2, learning_rate=3e-7, accumulation_steps=1, max_seq_len=768,
                          max_gen_len=1024)


# ------------------------------------------------------------------------------------------- flags, preparation

def add_rollout_args(g):
    """The rollout and reward flags GRPO and PPO share (MiniMind's names and defaults)."""
    g.add_argument("--max_gen_len", type=int, default=1024, help="new tokens per reply at most (default %(default)s); "
                   "--max_seq_len is the prompt's (its last tokens are kept)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default %(default)s)")
    g.add_argument("--thinking_ratio", type=float, default=None,
                   help="share of prompts that open a <think> block: minimind-3's template only (default 0.9 with "
                        "it; an error with MiniMind2's, which cannot switch thinking)")
    g.add_argument("--reward", default=None,
                   help="comma-separated sum of rules (MiniMind's length / think / repetition terms), answer (exact "
                        "match with the record's 'answer'; 0 for a record without one when other terms are given), "
                        "model (--reward_model_path) and module:function (your function(prompts, replies) -> "
                        "floats). Default: rules, plus model with --reward_model_path")
    g.add_argument("--reward_model_path", default=None,
                   help="local Hugging Face sequence-classification reward model folder (score clipped to +-3)")
    g.add_argument("--ref_weight", default=None,
                   help="reference weights: a stage prefix or path (default: the policy's starting weights)")


def check_rollout_args(args):
    """The shared flags, before anything is built (a user reward function is imported here)."""
    if args.max_gen_len < 1:
        raise engine.ConfigError(f"--max_gen_len must be >= 1, got {args.max_gen_len}")
    if args.temperature <= 0:
        raise engine.ConfigError(f"--temperature must be > 0 (rollouts sample), got {args.temperature}")
    if args.thinking_ratio is not None and not 0 <= args.thinking_ratio <= 1:
        raise engine.ConfigError(f"--thinking_ratio must be in [0, 1], got {args.thinking_ratio}")
    if args.reward_model_path is not None and not Path(args.reward_model_path).is_dir():
        raise engine.ConfigError(f"--reward_model_path {args.reward_model_path}: no such folder")
    parse_spec(args.reward, args.reward_model_path)


def loader_options(args, tokenizer):
    """--thinking_ratio for the rl loader: MiniMind's 0.9 where the template switches thinking; an error to set it
    where it cannot."""
    if not tokenizer.supports_thinking:
        if args.thinking_ratio is not None:
            raise engine.ConfigError(f"--thinking_ratio {args.thinking_ratio}: the tokenizer's chat template "
                                     f"({tokenizer.chat_format}) cannot switch thinking; minimind-3's can "
                                     f"(--tokenizer with a minimind-3 tokenizer)")
        return {"thinking_ratio": 0.0}
    if args.thinking_ratio is None:
        args.thinking_ratio = 0.9
    return {"thinking_ratio": args.thinking_ratio}


def prepare_rollouts(model, run):
    """What GRPO and PPO prepare alike, before training: the context check, the data check for --reward answer,
    the rewards in run.extras["rewards"] (a reward model loaded), and the reference it returns (a copy of the policy
    as loaded, or --ref_weight) for the stage to register."""
    args, config = run.args, run.config
    if args.max_seq_len + args.max_gen_len > config.max_position_embeddings:
        raise engine.ConfigError(f"--max_seq_len {args.max_seq_len} + --max_gen_len {args.max_gen_len} exceed the "
                                 f"model's context of {config.max_position_embeddings} tokens")
    meta, names = run.loader.cache.meta, [n for n, _ in parse_spec(args.reward, args.reward_model_path)]
    missing, total = meta["records_without_answer"], meta["records"]
    if "answer" in names and missing and (names == ["answer"] or missing == total):
        why = ("no record has one, so answer would never pay" if missing == total else
               "beside another reward term those records would get 0 from answer")
        raise engine.ConfigError(f"{meta['first_without_answer']}: the record has no 'answer' field, which --reward "
                                 f"answer compares the reply with ({missing} of {total} records lack one; {why})")
    if "answer" in names and missing:
        run.log(f"{missing} of {total} records have no 'answer' field (the first: {meta['first_without_answer']}): "
                f"the answer reward gives their replies 0, the other terms of --reward {args.reward} score them")
    dtype = run.dtype if run.device.type == "cuda" else torch.float32
    run.extras["rewards"] = Rewards(args.reward, args.reward_model_path, run.device, dtype)
    if args.ref_weight not in (None, "", "none"):
        return run.build_model(weights=args.ref_weight, flag="--ref_weight")
    return copy.deepcopy(model)  # the policy as loaded (prepare runs before any resume state is applied)


def score(rollout_batch, run):
    """(N,) summed rewards of a rollout (on its device) and each term's mean (reward_{name})."""
    total, parts = run.extras["rewards"](rollout_batch["records"], rollout_batch["replies"],
                                         rollout_batch["thinking"])
    return total.to(rollout_batch["input_ids"].device), {f"reward_{name}": v.mean() for name, v in parts.items()}


# ------------------------------------------------------------------------------------------------------ rollouts

def row_seeds(seed: int, epoch: int, items, num_generations: int):
    """The sampling seed of each row p * G + g: a function of (seed, epoch, record, g) alone, so a row samples the
    same tokens whichever process, micro-batch or resumed run draws it (its place in the data is its RNG state)."""
    return [int(np.random.SeedSequence([seed, epoch, int(i), g]).generate_state(1, np.uint64)[0] % (1 << 62))
            for i in items for g in range(num_generations)]


def sample(model, batch, run, num_generations, max_gen_len, temperature):
    """Roll out a prompt batch of the rl loader (minimind.data.PromptLoader): num_generations samples of each prompt
    at `temperature` (no top-k / top-p: the policy's own distribution), on the generation engine, under the run's
    autocast, with uncompiled blocks (see engine.eager_blocks). Returns a dict: the micro-batch tensors

        input_ids (N, T)   each row's prompt then its completion, right-padded
        sources (N, L)     where in input_ids the hidden state that predicts completion token j stands (clamped)
        targets (N, L)     the completion tokens, -100 off the mask
        mask (N, L)        float, 1 through the first <|im_end|>
        old_logprobs (N, L) the sampling pass's log-probs at temperature 1

    and, for the rewards and the metrics, replies (N decoded strings), records and thinking (one per row),
    rollout_s, generated (tokens) and row_tokens (each row's prompt and completion tokens)."""
    tokenizer, G = run.tokenizer, num_generations
    cfg = SamplingConfig(max_new_tokens=max_gen_len, temperature=temperature, top_p=1.0, top_k=0,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    seeds = row_seeds(run.args.seed, run.epoch, batch["prompt_index"].tolist(), G)
    t0 = time.perf_counter()
    with engine.eager_blocks(model), run.autocast():
        out = rollout(model, batch["prompts"], G, cfg, seeds=seeds)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    rollout_s = time.perf_counter() - t0
    mask = out.completion_mask
    N, L = mask.shape
    ids, _ = out.sequences(tokenizer.pad_id)
    prompt_len = torch.tensor([len(p) for p in out.prompts], device=ids.device)
    sources = (prompt_len[:, None] - 1 + torch.arange(L, device=ids.device)).clamp(max=ids.shape[1] - 1)
    lengths = mask.sum(dim=1).tolist()
    replies = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(out.completions, lengths)]
    return dict(input_ids=ids, sources=sources, targets=out.completions.masked_fill(~mask, IGNORE),
                mask=mask.float(), old_logprobs=out.logprobs, replies=replies,
                records=[r for r in batch["records"] for _ in range(G)],
                thinking=[t for t in batch["thinking"] for _ in range(G)], rollout_s=rollout_s,
                generated=int(sum(lengths)), row_tokens=[len(p) + n for p, n in zip(out.prompts, lengths)])


def rollout_metrics(rollout_batch, rewards, run):
    """What a step reports of its rollout: reward mean and std over the rows, mean response length (tokens), and
    the rollout's generated tokens per second (times the processes: every process rolls out its own prompts)."""
    r = rewards.float()
    return {"reward": r.mean(), "reward_std": r.std(unbiased=False),
            "response_len": rollout_batch["mask"].sum(dim=1).mean(),
            "rollout_tokens_per_s": torch.tensor(rollout_batch["generated"] / max(rollout_batch["rollout_s"], 1e-9)
                                                 * run.world_size)}


def completion_logprobs(model, batch):
    """(N, L) float32 log-probs of the completion tokens under a MiniMindForCausalLM (0 off the mask), and its MoE
    aux loss: one forward of input_ids, then ops.linear_logprobs on the (N * L) hidden states at `sources` only."""
    hidden, aux = model.model(batch["input_ids"])
    N, L = batch["targets"].shape
    H = hidden.shape[-1]
    h = hidden.gather(1, batch["sources"][..., None].expand(N, L, H)).reshape(N * L, H)
    lp = model.ops.linear_logprobs(h, model.lm_head.weight, batch["targets"].reshape(-1))
    return lp.view(N, L).float(), aux


# ---------------------------------------------------------------------------------------------------- the math

def masked_mean(x, mask):
    """Mean of x over the tokens where mask is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def sequence_mean(x, mask):
    """(N,) per-row mean of x (N, L) over the row's masked tokens (0 for a row without any)."""
    return (x * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def group_advantages(rewards, num_generations, eps=1e-4):
    """(N,) rewards of rows p * G + g -> (r - group mean) / (group std + eps), std the population one."""
    grouped = rewards.float().view(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=False, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def k3_kl(ref_logprobs, logprobs):
    """Per-token k3 estimate of KL(pi || ref): exp(ref - pi) - (ref - pi) - 1 (>= 0; unbiased under samples of pi)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, loss_type="cispo", beta=0.1, epsilon=0.2,
              epsilon_high=5.0):
    """The GRPO / CISPO loss of the module docstring. logprobs (N, L) with gradient; old, ref (N, L); advantages
    (N,); mask (N, L) float. Returns (loss, stats): kl (token mean), clip_fraction (share of tokens whose ratio the
    clip holds: cispo ratio > eps_high; grpo where the clipped term is the one taken), ratio (token mean)."""
    kl = k3_kl(ref_logprobs, logprobs)
    ratio = torch.exp(logprobs - old_logprobs)
    A = advantages[:, None]
    if loss_type == "cispo":
        per_token = -(torch.clamp(ratio, max=epsilon_high).detach() * A * logprobs - beta * kl)
        clipped = ratio > epsilon_high
    elif loss_type == "grpo":
        per_token = -(torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * A) - beta * kl)
        clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))
    else:
        raise ValueError(f"loss_type must be 'cispo' or 'grpo', got {loss_type!r}")
    loss = sequence_mean(per_token, mask).mean()
    with torch.no_grad():
        stats = {"kl": masked_mean(kl, mask), "clip_fraction": masked_mean(clipped.float(), mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over completion tokens. rewards, values, mask (N, L) (values and rewards 0
    off the mask). Returns (advantages, returns) (N, L), 0 past each row's end."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the masked tokens, 0 off the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_losses(logprobs, old_logprobs, ref_logprobs, advantages, values, old_values, returns, mask, clip_epsilon=0.2,
               cliprange_value=0.2, kl_coef=0.02):
    """MiniMind's PPO losses (module docstring); all (N, L), logprobs and values with gradient. Returns
    (policy_loss, value_loss, stats: approx_kl, kl (to the reference), clip_fraction (|ratio - 1| > eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    kl = k3_kl(ref_logprobs, logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - clip_epsilon, 1 + clip_epsilon)
    policy = masked_mean(torch.max(-advantages * ratio, -advantages * clipped_ratio), mask) + kl_coef * masked_mean(
        kl, mask)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    value = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask), "kl": masked_mean(kl, mask),
                 "clip_fraction": masked_mean(((ratio - 1).abs() > clip_epsilon).float(), mask)}
    return policy, value, stats
