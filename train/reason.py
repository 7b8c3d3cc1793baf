"""Reasoning distillation: SFT on `<think>...</think><answer>...</answer>` replies, with the template tags weighted.

Data: SFT format (MiniMind's r1_mix_1024.jsonl), assistant content `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.
Loss: weighted mean cross-entropy over assistant tokens,

    loss = sum_t w_t * ce_t / sum_t w_t,   w_t = --template_weight (10) where target t is part of a tag, else 1

so the model learns to keep the template. A target counts as a tag token when it lies inside an occurrence of the
full token sequence of `<think>`, `</think>`, `<answer>` or `</answer>` within the assistant span (labels != -100).
MiniMind2 instead weights every occurrence of any token that appears in a tag ('<', '>', 'th', ...), anywhere in
the reply, and divides by the unweighted token count. Starts from out/rlhf_*.pth (the DPO result); writes
out/reason_*.pth.

    python -m train.reason --data_path dataset/r1_mix_1024.jsonl
"""
import torch

from train import engine

TEMPLATE_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_token_ids(tokenizer):
    """The token id sequence of each template tag."""
    return [tokenizer.encode(tag) for tag in TEMPLATE_TAGS]


def template_weights(labels, tag_ids, weight):
    """(B, T) float weights aligned with labels: `weight` on every label inside an occurrence of a tag's id sequence,
    1 elsewhere. Occurrences are found on labels, so positions outside the assistant span (-100) never match."""
    B, T = labels.shape
    is_tag = torch.zeros_like(labels, dtype=torch.bool)
    for seq in tag_ids:
        k = len(seq)
        if k == 0 or k > T:
            continue
        seq = torch.tensor(seq, dtype=labels.dtype, device=labels.device)
        starts = (labels.unfold(1, k, 1) == seq).all(dim=-1)  # (B, T - k + 1): a tag starts here
        for j in range(k):
            is_tag[:, j:j + T - k + 1] |= starts
    w = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    return w.masked_fill(is_tag, float(weight)), is_tag


def reason_loss(model, batch, run):
    if "tag_ids" not in run.extras:
        run.extras["tag_ids"] = tag_token_ids(run.tokenizer)
    labels = batch["labels"]
    weights, is_tag = template_weights(labels, run.extras["tag_ids"], run.args.template_weight)
    out = model(batch["input_ids"], labels=labels, loss_weights=weights)  # right-padded rows: no mask needed
    return out.loss, {"aux_loss": out.aux_loss.detach(), "tag_tokens": is_tag.sum().float()}


def add_args(parser):
    parser.add_argument("--template_weight", type=float, default=10.0,
                        help="loss weight of the <think>/<answer> tag tokens (MiniMind2: 10)")


STAGE = engine.Stage(
    name="reason", data_kind="reason", save_prefix="reason", loss=reason_loss, add_args=add_args,
    defaults=dict(epochs=1, batch_size=8, learning_rate=1e-6, accumulation_steps=1, max_seq_len=1024,
                  data_path="dataset/r1_mix_1024.jsonl", from_weight="rlhf", wandb_project="MiniMind-Reasoning"),
    minimind3_defaults=None,  # minimind-3 has no reasoning-distillation recipe: MiniMind2's stays under its presets
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
