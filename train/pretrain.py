"""Pretraining: next-token prediction on plain text, from scratch.

Data: JSON Lines {"text": ...} (MiniMind's pretrain_hq.jsonl). Each text carries <|im_start|> ... <|im_end|> around
each of its segments, added where the file lacks them (--pretrain_markers). Rows are packed: documents back to back,
cut into max_seq_len rows with no padding (--no_pack: MiniMind2's one document per row, padded to max_seq_len).
Loss: mean cross-entropy over every non-pad target. Writes out/pretrain_{hidden}[_moe].pth.

    python -m train.pretrain --data_path dataset/pretrain_hq.jsonl            # MiniMind2-Small recipe
"""
from minimind.data.markers import POLICIES
from train import engine


def lm_loss(model, batch, run):
    """Mean next-token cross-entropy (plus the MoE auxiliary loss), computed from the hidden states.

    No attention mask: training rows are packed or right-padded, so causal attention already keeps every position
    that carries loss away from the pads, and the unmasked attention path is the fast one (no host sync).
    --no_pack (MiniMind2's padded rows) feeds each row without its last token, as MiniMind2 does (X = ids[:-1]):
    that position's prediction has no target, so the loss is the same and the step does 1/T less work (the MoE
    aux loss then counts the T - 1 tokens MiniMind2's does)."""
    ids = batch["input_ids"]
    if getattr(run.args, "no_pack", False):
        ids = ids[:, :-1]
    out = model(ids, labels=batch["labels"])
    return out.loss, {"aux_loss": out.aux_loss.detach()}


def add_args(parser):
    parser.add_argument("--no_pack", action="store_true",
                        help="one document per row padded to max_seq_len (MiniMind2's layout) instead of packing")
    parser.add_argument("--pretrain_markers", default="auto", choices=POLICIES,
                        help="<|im_start|>/<|im_end|> around the texts: only where a text's segments lack them "
                             "(auto; MiniMind2's pretrain_hq already carries them), around every text (always: "
                             "minimind-3's trainer), or none added (never: MiniMind2's trainer)")


STAGE = engine.Stage(
    name="pretrain", data_kind="pretrain", save_prefix="pretrain", loss=lm_loss, add_args=add_args,
    defaults=dict(epochs=1, batch_size=32, learning_rate=5e-4, accumulation_steps=8, max_seq_len=512,
                  data_path="dataset/pretrain_hq.jsonl", from_weight="none", wandb_project="MiniMind-Pretrain"),
    minimind3_defaults=dict(epochs=2, batch_size=32, learning_rate=5e-4, accumulation_steps=8, max_seq_len=340),
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
