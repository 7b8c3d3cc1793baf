"""White-box distillation: a student learns a bigger, frozen teacher's next-token distributions on SFT data.

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)), both
averaged over the assistant tokens, plus the student's MoE auxiliary loss (unscaled). MiniMind's convention
(train_distillation.py: total = alpha * CE + (1 - alpha) * KL); its flag defaults alpha 0.5, temperature 1.5 are
ours too. The loss is computed from both models' final hidden states in chunks of --distill_chunk tokens
(train/losses.py: chunked_distill_loss), so neither model's full-vocabulary logits for the whole batch are ever
held at once, and the student's gradient is formed chunk by chunk with nothing recomputed.

Student: the usual model flags (--hidden_size, --preset, ...) from --from_weight (full_sft). Teacher: --teacher_preset
and/or --teacher_hidden_size / --teacher_num_hidden_layers / --teacher_use_moe, weights --teacher_weight (a stage
prefix, read for the teacher's size, or a path; with a path and no size flags the size is read off the file).
Both must share the tokenizer. Writes out/full_dist_{hidden}[_moe].pth.

    python -m train.distill --preset small --teacher_preset base --data_path dataset/sft_mini_512.jsonl
"""
from pathlib import Path

import torch

from minimind.config import PRESETS, MiniMindConfig
from minimind.weights import model_config, read_state_dict
from train import checkpoint, engine
from train.losses import chunked_distill_loss

TEACHER_SIZE_FLAGS = ("hidden_size", "num_hidden_layers", "use_moe", "num_attention_heads", "num_key_value_heads")


def add_args(parser):
    g = parser.add_argument_group("distillation")
    g.add_argument("--temperature", type=float, default=1.5, help="softmax temperature T of the KL term")
    g.add_argument("--alpha", type=float, default=0.5, help="loss = alpha * CE + (1 - alpha) * KL")
    g.add_argument("--teacher_weight", default="full_sft", help="none | stage prefix | path of the teacher's weights")
    g.add_argument("--teacher_preset", default=None, choices=sorted(PRESETS),
                   help="teacher shape (default: base, MiniMind2's 104M, unless sizes are given or read off a file)")
    g.add_argument("--teacher_hidden_size", type=int, default=None, help="teacher shape: overrides the preset's")
    g.add_argument("--teacher_num_hidden_layers", type=int, default=None, help="teacher shape: overrides the preset's")
    g.add_argument("--teacher_use_moe", type=int, choices=(0, 1), default=None,
                   help="teacher shape: overrides the preset's")
    g.add_argument("--teacher_num_attention_heads", type=int, default=None,
                   help="teacher shape: overrides the preset's")
    g.add_argument("--teacher_num_key_value_heads", type=int, default=None,
                   help="teacher shape: overrides the preset's")
    g.add_argument("--distill_chunk", type=int, default=2048, help="tokens per chunk of the chunked loss")


def _sizes_from_file(path):
    """The teacher's shape from its weight file: the config written beside it, else read off the tensors
    (minimind.weights.model_config: hidden, layers, kv heads, MLP width, experts)."""
    try:
        cfg = model_config(read_state_dict(path), path)
    except (FileNotFoundError, ValueError) as e:
        raise engine.ConfigError(f"--teacher_weight {path}: {e}") from None
    return {k: v for k, v in cfg.to_dict().items() if k != "vocab_size"}


def teacher_config(args, student: MiniMindConfig) -> MiniMindConfig:
    """Preset, then the size read off a --teacher_weight path (if no explicit size flag), then explicit flags."""
    explicit = {k: getattr(args, f"teacher_{k}") for k in TEACHER_SIZE_FLAGS
                if getattr(args, f"teacher_{k}") is not None}
    if "use_moe" in explicit:
        explicit["use_moe"] = bool(explicit["use_moe"])
    sizes = dict(PRESETS[args.teacher_preset]) if args.teacher_preset else {}
    weight = args.teacher_weight
    is_path = weight not in (None, "", "none") and checkpoint.is_weight_path(weight)
    if is_path and not explicit and not args.teacher_preset:
        if not Path(weight).is_file():
            raise engine.ConfigError(f"--teacher_weight {weight}: no such file")
        sizes.update(_sizes_from_file(weight))
    if not sizes and not explicit:
        sizes = dict(PRESETS["base"])
    sizes.update(explicit)
    try:
        return MiniMindConfig(vocab_size=student.vocab_size, **sizes)
    except ValueError as e:
        raise engine.ConfigError(f"bad teacher flags: {e}") from None


def prepare(model, run):
    args = run.args
    if not 0.0 <= args.alpha <= 1.0 or args.temperature <= 0 or args.distill_chunk < 1:
        raise engine.ConfigError(f"need 0 <= --alpha <= 1, --temperature > 0, --distill_chunk >= 1; got "
                                 f"{args.alpha}, {args.temperature}, {args.distill_chunk}")
    cfg = teacher_config(args, run.config)
    weights = None if args.teacher_weight == "none" else args.teacher_weight
    teacher = run.add_frozen("teacher", run.build_model(config=cfg, weights=weights, flag="--teacher_weight"))
    run.log(f"teacher: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers{' moe' if cfg.use_moe else ''}, "
            f"{teacher.num_parameters():,} parameters; student {model.num_parameters():,}")
    return model


def distill_loss(model, batch, run):
    args, teacher = run.args, run.extras["teacher"]
    ids = batch["input_ids"]  # right-padded rows: causal attention needs no mask (see train.pretrain.lm_loss)
    hidden, aux = model.model(ids)
    with torch.no_grad():
        teacher_hidden = teacher.model(ids)[0]
    loss, ce, kl = chunked_distill_loss(hidden, model.lm_head.weight, teacher_hidden, teacher.lm_head.weight,
                                        batch["labels"], args.temperature, args.alpha, args.distill_chunk)
    return loss + aux, {"ce_loss": ce, "kl_loss": kl, "aux_loss": aux.detach()}


STAGE = engine.Stage(
    name="distill", data_kind="sft", save_prefix="full_dist", loss=distill_loss, add_args=add_args, prepare=prepare,
    defaults=dict(epochs=6, batch_size=32, learning_rate=5e-6, accumulation_steps=1, max_seq_len=512,
                  from_weight="full_sft", data_path="dataset/sft_mini_512.jsonl", wandb_project="MiniMind-Distill"),
    minimind3_defaults=dict(epochs=6, batch_size=32, learning_rate=5e-6, accumulation_steps=1, max_seq_len=340,
                            alpha=0.5, temperature=1.5),
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
