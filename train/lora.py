"""LoRA fine-tuning: SFT on assistant tokens with only low-rank adapters trained (minimind/lora.py).

Starts from full_sft_{hidden}.pth, wraps MiniMind2's target layers (the square ones: q_proj and o_proj) in
adapters of rank --lora_rank, freezes everything else, trains on SFT-format data (MiniMind's lora_identity.jsonl,
lora_medical.jsonl) and writes only the adapter weights to out/lora/{lora_name}_{hidden}.pth, with MiniMind2's
keys (`model.layers.0.self_attn.q_proj.lora.A.weight`, ...; scale folded into B, see minimind/lora.py). The
adapter file is kept in float32: it is small (about 1 MB at rank 8 for MiniMind2-Small) and reloads exactly.

    python -m train.lora --lora_name lora_identity --data_path dataset/lora_identity.jsonl
    python -m train.lora --lora_targets all --lora_rank 16 --lora_alpha 32 ...

Use an adapter: apply_lora(model, rank) then load_lora(model, torch.load(path)); merge_lora / remove_lora to
fold it into the base weights.
"""
import torch

from minimind.lora import apply_lora, lora_parameters, lora_state_dict
from train import engine, flops
from train.sft import assistant_loss


def add_args(parser):
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_name", default="lora_identity", help="adapter file: OUT_DIR/lora/{lora_name}_{hidden}.pth")
    g.add_argument("--lora_rank", type=int, default=8,
                   help="rank r of each adapter A (r x in), B (out x r) (default %(default)s)")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="the adapter output is scaled by alpha / rank (default: alpha = rank, scale 1, as MiniMind2)")
    g.add_argument("--lora_targets", default="square",
                   help="square (MiniMind2: square linear layers) | all (every linear in the blocks) | "
                        "comma-separated layer names such as q_proj,v_proj")


def prepare(model, run):
    """Wrap the target layers; the A matrices come from a generator seeded by --seed (deterministic on resume)."""
    args = run.args
    try:
        names = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets,
                           generator=torch.Generator().manual_seed(args.seed))
    except ValueError as e:
        raise engine.ConfigError(f"--lora_rank {args.lora_rank} --lora_targets {args.lora_targets}: {e}") from None
    n_train = sum(p.numel() for p in lora_parameters(model))
    run.log(f"LoRA rank {args.lora_rank} on {len(names)} layers ({args.lora_targets}): {n_train:,} trainable of "
            f"{sum(p.numel() for p in model.parameters()):,} parameters")
    return model


def flops_per_token(model, seq_len):
    """Forward + backward flops per token with a frozen base: frozen matrices cost 2N forward + 2N for the
    gradient of their input (no weight gradient), adapters the usual 6N; attention as in the engine's formula."""
    n_adapter = sum(p.numel() for p in lora_parameters(model))
    n_matmul = flops.matmul_params(model)  # counts the base layers and the adapters' A and B
    attention = flops.default_flops_per_token(model, seq_len) - 6 * n_matmul
    return 4 * (n_matmul - n_adapter) + 6 * n_adapter + attention


def adapter_weights(model, run):
    return {k: v.float().cpu() for k, v in lora_state_dict(model).items()}


def adapter_path(run):
    return run.out_dir / "lora" / f"{run.args.lora_name}_{run.config.hidden_size}.pth"


STAGE = engine.Stage(
    name="lora", data_kind="sft", save_prefix="lora", loss=assistant_loss, add_args=add_args, prepare=prepare,
    trainable=lora_parameters, weights=adapter_weights, weights_path=adapter_path, flops_per_token=flops_per_token,
    defaults=dict(epochs=10, batch_size=32, learning_rate=1e-4, accumulation_steps=1, max_seq_len=512,
                  from_weight="full_sft", data_path="dataset/lora_identity.jsonl", wandb_project="MiniMind-LoRA"),
    minimind3_defaults=dict(epochs=10, batch_size=32, learning_rate=1e-4, accumulation_steps=1, max_seq_len=340,
                            lora_rank=16, lora_targets="square"),  # minimind-3's square linears: q_proj, o_proj
)


def main(argv=None):
    return engine.main(STAGE, argv)


if __name__ == "__main__":
    main()
