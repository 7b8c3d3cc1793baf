"""GRPO / CISPO: group-relative policy optimisation on the policy's own rollouts, MiniMind's recipe (train/rl.py has
the math, train/rewards.py the rewards).

Each optimizer step, for each of its A micro-batches: a batch of --batch_size prompts (minimind.data's rl kind:
MiniMind's rlaif.jsonl, the prompt being every message but the last) is rolled out --num_generations times on the
generation engine (minimind/generate.py: KV cache, each row stopping at <|im_end|>, --temperature, at most
--max_gen_len new tokens, the old log-probs from the same pass); --reward scores every reply; advantages are
normalised within each prompt's group; the loss (--loss_type cispo | grpo, KL to the frozen reference with weight
--beta) is the mean over the rows of each row's mean over its completion tokens. Policy and reference log-probs go
through ops.linear_logprobs on the completion positions only: no (rows, T, vocab) tensor is ever built.

The reference is a frozen copy of the policy as loaded (--from_weight; or --ref_weight). With a minimind-3
tokenizer a prompt opens a <think> block with probability --thinking_ratio (MiniMind: 0.9). Each row's sampling
seed is a function of (--seed, epoch, record, sample), so a resumed run and a run on W processes sample what one
uninterrupted process samples. The progress bar and {out_dir}/grpo_metrics.jsonl report reward (mean, std and each
term), kl, response_len, clip_fraction, rollout_s and rollout_tokens_per_s beside the training tokens_per_s.

    python -m train.grpo --data_path dataset/rlaif.jsonl --reward rules,model --reward_model_path ../internlm2-reward
    python -m train.grpo --data_path qa.jsonl --reward answer --loss_type grpo     # records with an "answer" field

Writes out/grpo_{hidden}[_moe].pth. Usable from Python: `grpo.main([...flags])` returns the engine's result dict.
"""
import torch

from train import engine, rl


def add_args(parser):
    g = parser.add_argument_group("GRPO / CISPO (MiniMind's train_grpo.py flags)")
    g.add_argument("--num_generations", type=int, default=6, help="samples per prompt, one group (default %(default)s)")
    g.add_argument("--beta", type=float, default=0.1, help="weight of the k3 KL to the reference (default %(default)s)")
    g.add_argument("--loss_type", default="cispo", choices=("cispo", "grpo"),
                   help="cispo: clipped-ratio-weighted policy gradient; grpo: PPO-style clipped ratio "
                        "(default %(default)s)")
    g.add_argument("--epsilon", type=float, default=0.2, help="grpo: ratio clip 1 +- epsilon (default %(default)s)")
    g.add_argument("--epsilon_high", type=float, default=5.0,
                   help="cispo: the ratio weight is min(ratio, epsilon_high) (default %(default)s)")
    rl.add_rollout_args(g)


def check_args(args):
    if args.num_generations < 2:
        raise engine.ConfigError(f"--num_generations must be >= 2 (advantages compare the samples of a prompt), "
                                 f"got {args.num_generations}")
    if args.beta < 0:
        raise engine.ConfigError(f"--beta must be >= 0, got {args.beta}")
    if not 0 < args.epsilon < 1:
        raise engine.ConfigError(f"--epsilon must be in (0, 1), got {args.epsilon}")
    if args.epsilon_high <= 0:
        raise engine.ConfigError(f"--epsilon_high must be > 0, got {args.epsilon_high}")
    rl.check_rollout_args(args)


def prepare(model, run):
    run.add_frozen("ref", rl.prepare_rollouts(model, run))  # the loss runs it: one forward per step, in MFU
    return model


def rollout_micro_batch(batch, run):
    """One prompt batch -> the micro-batch of the GRPO loss: its rollout, rewards and group advantages."""
    args = run.args
    ro = rl.sample(run.model, batch, run, args.num_generations, args.max_gen_len, args.temperature)
    rewards, terms = rl.score(ro, run)
    metrics = {**rl.rollout_metrics(ro, rewards, run), **terms}
    return dict(input_ids=ro["input_ids"], sources=ro["sources"], targets=ro["targets"], mask=ro["mask"],
                old_logprobs=ro["old_logprobs"], advantages=rl.group_advantages(rewards, args.num_generations),
                tokens=sum(ro["row_tokens"]), metrics=metrics)


def make_steps(batches, run):
    """One optimizer step of the A micro-batches, each the rollout of one prompt batch."""
    return [[rollout_micro_batch(b, run) for b in batches]]


def policy_loss(model, ref, batch, args, logprobs=rl.completion_logprobs):
    """The loss of one rollout micro-batch: (GRPO / CISPO loss + MoE aux loss, {metric: value}). logprobs(model,
    batch) -> ((N, L) completion log-probs, aux): ours through ops.linear_logprobs; bench.rl passes a MiniMind-style
    full-logits one to measure the same step both ways."""
    policy_logprobs, aux = logprobs(model, batch)
    with torch.no_grad():
        ref_logprobs, _ = logprobs(ref, batch)
    loss, stats = rl.grpo_loss(policy_logprobs, batch["old_logprobs"], ref_logprobs, batch["advantages"],
                               batch["mask"], args.loss_type, args.beta, args.epsilon, args.epsilon_high)
    return loss + aux, {"policy_loss": loss.detach(), "aux_loss": aux.detach(), **stats}


def grpo_step_loss(model, batch, run):
    loss, metrics = policy_loss(model, run.extras["ref"], batch, run.args)
    return loss, {**metrics, **batch["metrics"]}


STAGE = engine.Stage(
    name="grpo", data_kind="rl", save_prefix="grpo", loss=grpo_step_loss, add_args=add_args, prepare=prepare,
    check_args=check_args, loader_options=rl.loader_options, make_steps=make_steps, tokens=lambda b: b["tokens"],
    defaults=dict(rl.DEFAULTS, wandb_project="MiniMind-GRPO"), minimind3_defaults=rl.MINIMIND3_DEFAULTS,
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
