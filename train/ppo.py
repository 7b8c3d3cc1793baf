"""PPO: the policy (actor) and a critic trained together on the actor's rollouts, MiniMind's recipe (train/rl.py has
the math and the rollout, train/rewards.py the rewards).

Each step, for each of its A micro-batches: a batch of --batch_size prompts (the rl kind, as GRPO) is rolled out once
per prompt on the generation engine; --reward scores each reply, given at its last token; the critic's values,
the frozen reference's log-probs and the rollout's own (old) log-probs are kept; GAE (--gamma 1, --lam 0.95) gives
the advantages (whitened over the rollout's tokens) and the returns. Then --ppo_update_iters passes, each over the
rows shuffled and cut into mini-batches of --mini_batch_size: one optimizer step per mini-batch (of the A
rollouts' mini-batches, one each), minimising policy + --vf_coef * value (+ the MoE aux loss): the clipped ratio
(--clip_epsilon), a k3 KL to the reference (--kl_coef) and a clipped value loss (--cliprange_value). When a step's
approx_kl (0.5 * mean (pi - old)^2, over the processes) exceeds --early_stop_kl, the step is kept and the passes
over this rollout end (MiniMind zeroes that step's loss and still steps AdamW, whose momentum moves the weights).
The learning rate is the schedule's at this step for every update of it; the critic's is scaled by
--critic_learning_rate / --learning_rate. Actor and critic are clipped to --grad_clip each, as MiniMind does
(under --deepspeed, DeepSpeed clips them together: one norm over both).

The critic (`ValueModel`) is a MiniMind body with a scalar value head, its own weights initialised from the policy's
body (MiniMind loads the policy's weights into it) and a new head. Writes out/ppo_actor_{hidden}[_moe].pth (the
policy, MiniMind's format) and out/ppo_critic_{hidden}[_moe].pth (body and value_head, fp16); the resume state
holds both, and both optimizers' state in one AdamW.

    python -m train.ppo --data_path dataset/rlaif.jsonl --reward rules,model --reward_model_path ../internlm2-reward
"""
import copy

import numpy as np
import torch
import torch.nn as nn

from train import checkpoint, distributed, engine, flops, rl
from train.checkpoint import atomic_save, fp16_state_dict


class ValueModel(nn.Module):
    """The critic: V (N, L) = value_head(final hidden state at `sources`), float32. body: a MiniMindModel."""

    def __init__(self, body, config):
        super().__init__()
        self.config, self.model = config, body
        self.value_head = nn.Linear(config.hidden_size, 1)

    def forward(self, batch):
        hidden, _ = self.model(batch["input_ids"])
        N, L = batch["sources"].shape
        h = hidden.gather(1, batch["sources"][..., None].expand(N, L, hidden.shape[-1]))
        return self.value_head(h).squeeze(-1).float()


class ActorCritic(nn.Module):
    """What PPO trains, one module to the engine: one optimizer (two param groups: the critic's learning rate is
    critic_lr_scale times the actor's), one DDP wrapper, one resume state."""

    def __init__(self, actor, critic, critic_lr_scale=1.0):
        super().__init__()
        self.actor, self.critic, self.critic_lr_scale = actor, critic, critic_lr_scale


def add_args(parser):
    g = parser.add_argument_group("PPO (MiniMind's train_ppo.py flags)")
    g.add_argument("--critic_learning_rate", type=float, default=5e-7, help="critic LR (default %(default)s)")
    g.add_argument("--clip_epsilon", type=float, default=0.2, help="ratio clip 1 +- eps (default %(default)s)")
    g.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss (default %(default)s)")
    g.add_argument("--kl_coef", type=float, default=0.02, help="weight of the k3 KL to the reference "
                   "(default %(default)s)")
    g.add_argument("--gamma", type=float, default=1.0, help="GAE discount (default %(default)s)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default %(default)s)")
    g.add_argument("--cliprange_value", type=float, default=0.2,
                   help="value clip: V within old V +- this (default %(default)s)")
    g.add_argument("--ppo_update_iters", type=int, default=2, help="update passes over each rollout "
                   "(default %(default)s)")
    g.add_argument("--early_stop_kl", type=float, default=0.25,
                   help="end a rollout's passes after a step whose approx KL exceeds this (default %(default)s)")
    g.add_argument("--mini_batch_size", type=int, default=2, help="rows per update step (default %(default)s)")
    rl.add_rollout_args(g)


def check_args(args):
    for name in ("critic_learning_rate", "clip_epsilon", "early_stop_kl"):
        if getattr(args, name) <= 0:
            raise engine.ConfigError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("vf_coef", "kl_coef", "cliprange_value"):
        if getattr(args, name) < 0:
            raise engine.ConfigError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("gamma", "lam"):
        if not 0 <= getattr(args, name) <= 1:
            raise engine.ConfigError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name in ("ppo_update_iters", "mini_batch_size"):
        if getattr(args, name) < 1:
            raise engine.ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    rl.check_rollout_args(args)


def prepare(model, run):
    """The reference (outside the step: it runs once per rollout) and the critic: a copy of the policy's body and a
    new value head (nn.Linear's initialisation, drawn from --seed)."""
    run.add_frozen("ref", rl.prepare_rollouts(model, run), in_step=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.args.seed)
        critic = ValueModel(copy.deepcopy(model.model), model.config)
    return ActorCritic(model, critic.to(run.device), run.args.critic_learning_rate / run.args.learning_rate)


def trainable(model):
    """Two param groups, clipped each on its own; the critic's at --critic_learning_rate."""
    return [{"params": list(model.actor.parameters())},
            {"params": list(model.critic.parameters()), "lr_scale": model.critic_lr_scale}]


def rollout_micro_batch(batch, run):
    """One prompt batch -> its rollout with everything the update passes need (module docstring)."""
    args, model = run.args, run.model
    ro = rl.sample(model.actor, batch, run, 1, args.max_gen_len, args.temperature)
    rewards, terms = rl.score(ro, run)
    mask = ro["mask"]
    with torch.no_grad(), run.autocast():
        values = model.critic(ro) * mask
        ref_logprobs, _ = rl.completion_logprobs(run.extras["ref"], ro)
    token_rewards = torch.zeros_like(mask)
    last = (mask.sum(dim=1) - 1).long()  # every row has at least one token
    token_rewards[torch.arange(len(last), device=mask.device), last] = rewards
    advantages, returns = rl.gae(token_rewards, values, mask, args.gamma, args.lam)
    return dict(input_ids=ro["input_ids"], sources=ro["sources"], targets=ro["targets"], mask=mask,
                old_logprobs=ro["old_logprobs"], ref_logprobs=ref_logprobs, old_values=values, returns=returns,
                advantages=rl.whiten(advantages, mask), row_tokens=ro["row_tokens"],
                metrics={**rl.rollout_metrics(ro, rewards, run), **terms})


def mini_batch(micro, rows):
    """The rows (a list of indices) of a rollout's micro-batch."""
    idx = torch.tensor(rows, device=micro["input_ids"].device)
    out = {k: v.index_select(0, idx) for k, v in micro.items() if torch.is_tensor(v)}
    out.update(tokens=sum(micro["row_tokens"][i] for i in rows), metrics=micro["metrics"])
    return out


def make_steps(batches, run):
    """Roll out the A prompt batches, then --ppo_update_iters passes of mini-batch steps (module docstring). The
    shuffles are drawn from (--seed, epoch, the batch's records, pass): the same on any number of processes and on
    resume."""
    args = run.args
    micro = [rollout_micro_batch(b, run) for b in batches]
    n = len(micro[0]["row_tokens"])
    for it in range(args.ppo_update_iters):
        orders = [np.random.default_rng([args.seed, run.epoch, it, *b["prompt_index"].tolist()]).permutation(n)
                  for b in batches]
        for start in range(0, n, args.mini_batch_size):
            yield [mini_batch(m, order[start:start + args.mini_batch_size].tolist())
                   for m, order in zip(micro, orders)]
            kl = run.step_metrics["approx_kl"] / len(micro)
            if float(distributed.all_reduce_mean(kl.reshape(1), run.dist)) > args.early_stop_kl:
                return


def ppo_step_loss(model, batch, run):
    args = run.args
    logprobs, aux = rl.completion_logprobs(model.actor, batch)
    values = model.critic(batch)
    policy, value, stats = rl.ppo_losses(logprobs, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                                         values, batch["old_values"], batch["returns"], batch["mask"],
                                         args.clip_epsilon, args.cliprange_value, args.kl_coef)
    return policy + args.vf_coef * value + aux, {"policy_loss": policy.detach(), "value_loss": value.detach(),
                                                 "aux_loss": aux.detach(), **stats, **batch["metrics"]}


def critic_path(run):
    """ppo_actor_{hidden}.pth -> ppo_critic_{hidden}.pth (else {save_weight}_critic_...)."""
    prefix = run.args.save_weight
    prefix = prefix[:-len("actor")] + "critic" if prefix.endswith("actor") else prefix + "_critic"
    return run.out_dir / checkpoint.weight_file_name(prefix, run.config)


def weights(model, run):
    """Writes the critic beside the actor; returns the actor's weight file (MiniMind's format)."""
    atomic_save(fp16_state_dict(model.critic), critic_path(run))
    return fp16_state_dict(model.actor)


def flops_per_token(model, seq_len):
    """Actor and critic, each a forward and a backward per token."""
    return sum(flops.default_flops_per_token(m, seq_len) for m in (model.actor, model.critic))


STAGE = engine.Stage(
    name="ppo", data_kind="rl", save_prefix="ppo_actor", loss=ppo_step_loss, add_args=add_args, prepare=prepare,
    trainable=trainable, weights=weights, flops_per_token=flops_per_token, check_args=check_args,
    loader_options=rl.loader_options, make_steps=make_steps, tokens=lambda b: b["tokens"],
    defaults=dict(rl.DEFAULTS, wandb_project="MiniMind-PPO"),
    minimind3_defaults=dict(rl.MINIMIND3_DEFAULTS, critic_learning_rate=5e-7),
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
