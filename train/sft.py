"""Supervised fine-tuning: chat conversations, loss only on the assistant's tokens.

Data: JSON Lines {"conversations": [{"role": "user", ...}, {"role": "assistant", ...}, ...]} (MiniMind's
sft_mini_512.jsonl). Each conversation is rendered in MiniMind2's ChatML; labels are -100 everywhere except the
assistant replies (from after `<|im_start|>assistant\\n` through `<|im_end|>\\n`). Batches are length-bucketed,
so little compute goes to padding. Starts from out/pretrain_{hidden}[_moe].pth; writes out/full_sft_*.pth.

    python -m train.sft --data_path dataset/sft_mini_512.jsonl                 # MiniMind2-Small recipe
"""
from train import engine


def assistant_loss(model, batch, run):
    """Mean cross-entropy over the assistant tokens of the micro-batch (plus the MoE auxiliary loss). Rows are
    right-padded: no attention mask needed (see train.pretrain.lm_loss)."""
    out = model(batch["input_ids"], labels=batch["labels"])
    return out.loss, {"aux_loss": out.aux_loss.detach()}


STAGE = engine.Stage(
    name="sft", data_kind="sft", save_prefix="full_sft", loss=assistant_loss,
    defaults=dict(epochs=2, batch_size=16, learning_rate=5e-7, accumulation_steps=1, max_seq_len=512,
                  data_path="dataset/sft_mini_512.jsonl", from_weight="pretrain", wandb_project="MiniMind-Full-SFT"),
    minimind3_defaults=dict(epochs=2, batch_size=16, learning_rate=1e-5, accumulation_steps=1, max_seq_len=768),
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
