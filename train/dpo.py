"""DPO: direct preference optimisation against a frozen reference, MiniMind2's recipe (train/losses.py has the math).

Policy and reference both start from full_sft_{hidden}.pth (the reference is a frozen copy of the policy as
loaded, or --ref_weight). Per pair, each model's sequence log-probability is the mean token log-probability over
the assistant tokens, from `model.token_logprobs` (the `linear_logprobs` op: a fused backend never builds the
full logits); chosen and rejected rows run as one stacked batch. loss = -logsigmoid(beta * ((pi_c - pi_r) -
(ref_c - ref_r))), beta = --beta. Writes out/rlhf_{hidden}[_moe].pth.

--precompute_ref: before training, one pass of the reference over the whole data set (every process its share,
then exchanged) stores each pair's reference log-probabilities in a (pairs, 2) tensor on the device, indexed by
the batch's `pair_index`; training looks them up there (no host synchronisation) and the reference model is freed. The values are the same ones the per-step path
computes (up to float rounding from a different batch shape); the reference runs once over the data instead of
once per epoch, and its memory is given back for training.

    python -m train.dpo --data_path dataset/dpo.jsonl            # MiniMind2: beta 0.1, lr 1e-8, batch 4, len 1024
"""
import copy

import torch

from train import engine
from train.losses import dpo_batch_logprobs, dpo_loss

SIDES = ("chosen", "rejected")


def add_args(parser):
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the KL anchor to the reference (default %(default)s)")
    g.add_argument("--ref_weight", default=None,
                   help="reference weights: a stage prefix or path (default, or 'none': the policy's starting "
                        "weights)")
    g.add_argument("--precompute_ref", action="store_true",
                   help="compute the reference log-probabilities once before training and free the reference model")


@torch.no_grad()
def precompute_reference(ref, run):
    """(pairs, 2) float32 on the device: the reference log-probabilities of every pair's chosen and rejected
    sequence, row = pair_index (each process computes its share of every batch, then the shares are summed)."""
    from minimind.data import build_loader
    args = run.args
    loader = build_loader("dpo", args.data_path, run.tokenizer, max_seq_len=args.max_seq_len,
                          batch_size=args.batch_size, seed=args.seed, rank=run.rank, world_size=run.world_size,
                          skip_bad_records=args.skip_bad_records, drop_last=False)
    n_pairs = len(loader.cache.lengths) // 2
    values = torch.zeros(n_pairs, 2, dtype=torch.float32, device=run.device)
    for batch in loader.every_batch():  # the tail batches too: training's epochs reach every pair
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with run.autocast():
            chosen, rejected, _ = dpo_batch_logprobs(ref, batch)
        values.index_add_(0, batch["pair_index"], torch.stack([chosen, rejected], dim=1).float())
    if run.world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(values)
    return values


def prepare(model, run):
    args = run.args
    if args.ref_weight not in (None, "", "none"):
        ref = run.build_model(weights=args.ref_weight, flag="--ref_weight")
    else:
        ref = copy.deepcopy(model)  # the policy as loaded (prepare runs before any resume state is applied)
    ref = run.add_frozen("ref", ref)
    if args.precompute_ref:
        run.extras["ref_cache"] = precompute_reference(ref, run)
        run.log(f"DPO: reference log-probabilities of {len(run.extras['ref_cache']):,} pairs precomputed")
        del run.extras["ref"], ref  # freed: training only looks the values up (and MFU no longer counts it)
    return model


def reference_logprobs(batch, run):
    """(chosen (B,), rejected (B,)) of the frozen reference: from the precomputed table or a no-grad forward."""
    table = run.extras.get("ref_cache")
    if table is None:
        with torch.no_grad():
            chosen, rejected, _ = dpo_batch_logprobs(run.extras["ref"], batch)
        return chosen, rejected
    rows = table[batch["pair_index"]]
    return rows[:, 0], rows[:, 1]


def dpo_step_loss(model, batch, run):
    policy_chosen, policy_rejected, aux = dpo_batch_logprobs(model, batch)
    ref_chosen, ref_rejected = reference_logprobs(batch, run)
    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, run.args.beta)
    return loss + aux, {"dpo_loss": loss.detach(), "aux_loss": aux.detach(), **stats}


STAGE = engine.Stage(
    name="dpo", data_kind="dpo", save_prefix="rlhf", loss=dpo_step_loss, add_args=add_args, prepare=prepare,
    defaults=dict(epochs=2, batch_size=4, learning_rate=1e-8, accumulation_steps=1, max_seq_len=1024,
                  from_weight="full_sft", data_path="dataset/dpo.jsonl", wandb_project="MiniMind-RLHF"),
    minimind3_defaults=dict(epochs=1, batch_size=4, learning_rate=4e-8, accumulation_steps=1, max_seq_len=1024,
                            beta=0.15),
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
