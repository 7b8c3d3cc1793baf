"""DPO: direct preference optimisation against a frozen reference, MiniMind2's recipe (train/losses.py has the math).

Policy and reference both start from full_sft_{hidden}.pth (the reference is a frozen copy of the policy as
loaded, or --ref_weight). Per pair, each model's sequence log-probability is the mean token log-probability over
the assistant tokens, from `model.token_logprobs` (the `linear_logprobs` op: a fused backend never builds the
full logits); chosen and rejected rows run as one stacked batch. loss = -logsigmoid(beta * ((pi_c - pi_r) -
(ref_c - ref_r))), beta = --beta. Writes out/rlhf_{hidden}[_moe].pth.

--precompute_ref: before training, one pass of the reference over the whole data set (every process its share,
then exchanged) stores each sequence's reference log-probability, keyed by a hash of its tokens and loss mask;
training then looks them up and the reference model is freed. The values are the same ones the per-step path
computes (up to float rounding from a different batch shape); the reference runs once over the data instead of
once per epoch, and its memory is given back for training.

    python -m train.dpo --data_path dataset/dpo.jsonl            # MiniMind2: beta 0.1, lr 1e-8, batch 4, len 1024
"""
import copy
import hashlib

import numpy as np
import torch

from train import engine
from train.losses import dpo_batch_logprobs, dpo_loss

SIDES = ("chosen", "rejected")


def add_args(parser):
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="strength of the KL anchor to the reference")
    g.add_argument("--ref_weight", default=None,
                   help="reference weights: a stage prefix or path (default: the policy's starting weights)")
    g.add_argument("--precompute_ref", action="store_true",
                   help="compute the reference log-probabilities once before training and free the reference model")


def sequence_keys(batch, side):
    """One key per row: a hash of its real tokens and its loss mask (padding and batch shape do not matter)."""
    ids = batch[f"{side}_input_ids"].cpu().numpy()
    mask = batch[f"{side}_attention_mask"].cpu().numpy().astype(bool)
    scored = (batch[f"{side}_labels"].cpu().numpy() != -100)
    keys = []
    for row in range(ids.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids[row][mask[row]].astype(np.int32).tobytes())
        h.update(np.packbits(scored[row][mask[row]]).tobytes())
        keys.append(h.digest())
    return keys


@torch.no_grad()
def precompute_reference(ref, run):
    """{sequence key: reference log-probability} over the whole data set (this process's share, then merged)."""
    from minimind.data import build_loader
    args = run.args
    loader = build_loader("dpo", args.data_path, run.tokenizer, max_seq_len=args.max_seq_len,
                          batch_size=args.batch_size, seed=args.seed, rank=run.rank, world_size=run.world_size,
                          skip_bad_records=args.skip_bad_records, drop_last=False)
    cache = {}
    for batch in loader:
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with run.autocast():
            chosen, rejected, _ = dpo_batch_logprobs(ref, batch)
        for side, values in zip(SIDES, (chosen, rejected)):
            cache.update(zip(sequence_keys(batch, side), values.float().tolist()))
    if run.world_size > 1:
        import torch.distributed as dist
        parts = [None] * run.world_size
        dist.all_gather_object(parts, cache)
        cache = {k: v for part in parts for k, v in part.items()}
    return cache


def prepare(model, run):
    args = run.args
    if args.ref_weight:
        ref = run.build_model(weights=args.ref_weight)
    else:
        ref = copy.deepcopy(model)  # the policy as loaded (prepare runs before any resume state is applied)
    ref.eval().requires_grad_(False)
    if args.precompute_ref:
        run.extras["ref_cache"] = precompute_reference(ref, run)
        run.log(f"DPO: reference log-probabilities of {len(run.extras['ref_cache']):,} sequences precomputed")
        del ref
    else:
        run.extras["ref"] = ref
    return model


def reference_logprobs(batch, run):
    """(chosen (B,), rejected (B,)) of the frozen reference: from the precomputed cache or a no-grad forward."""
    cache = run.extras.get("ref_cache")
    if cache is None:
        with torch.no_grad():
            chosen, rejected, _ = dpo_batch_logprobs(run.extras["ref"], batch)
        return chosen, rejected
    out = []
    for side in SIDES:
        try:
            values = [cache[k] for k in sequence_keys(batch, side)]
        except KeyError:
            raise RuntimeError("--precompute_ref: a training sequence is missing from the reference cache (did "
                               "the data file change during the run?); run without --precompute_ref") from None
        out.append(torch.tensor(values, dtype=torch.float32, device=batch[f"{side}_input_ids"].device))
    return out[0], out[1]


def dpo_step_loss(model, batch, run):
    policy_chosen, policy_rejected, aux = dpo_batch_logprobs(model, batch)
    ref_chosen, ref_rejected = reference_logprobs(batch, run)
    loss, stats = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, run.args.beta)
    return loss + aux, {"dpo_loss": loss.detach(), "aux_loss": aux.detach(), **stats}


STAGE = engine.Stage(
    name="dpo", data_kind="dpo", save_prefix="rlhf", loss=dpo_step_loss, add_args=add_args, prepare=prepare,
    defaults=dict(epochs=2, batch_size=4, learning_rate=1e-8, accumulation_steps=1, max_seq_len=1024,
                  from_weight="full_sft", data_path="dataset/dpo.jsonl", wandb_project="MiniMind-RLHF"),
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
