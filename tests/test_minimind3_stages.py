"""Every stage trains minimind-3 (`--preset minimind3` and `--preset minimind3-moe`) at a tiny size with its
structure: q/k norm, 8 query / 4 key-value heads of 24 (not hidden / heads), and for MoE 4 routed experts, top-1,
no shared expert, the batch-level aux loss. pretrain -> sft -> lora, dpo, distill (the sft model as its teacher),
reason; each writes minimind-3's keys and a card that reopens the model. The triton backend (q/k norm + RoPE
fused, the MoE kernel) takes the same pretrain steps as torch."""
import math

import pytest
import torch

from tests.train_helpers import demo_data, one_thread, tiny_flags  # noqa: F401  (fixtures)
from minimind.weights import load_model, read_card
from train import distill, dpo, engine, lora, pretrain, reason, sft

pytestmark = pytest.mark.usefixtures("one_thread")
PRESETS = ("minimind3", "minimind3-moe")


def _check_weights(result, preset):
    sd = torch.load(result["weights_path"], weights_only=True)
    assert "model.layers.1.self_attn.q_norm.weight" in sd and sd["model.layers.1.self_attn.k_norm.weight"].shape == (24,)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (4 * 24, 64)
    if preset.endswith("moe"):
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in sd and not any("shared_experts" in k for k in sd)
    card = read_card(result["weights_path"])["config"]
    assert card.qk_norm and card.head_dim == 24 and card.use_moe == preset.endswith("moe")
    assert all(math.isfinite(loss) for _, loss in result["losses"])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_stage_trains_minimind3(preset, demo_data, tmp_path):  # noqa: F811
    def run(stage, kind, steps=3, extra=()):
        result = stage.main(tiny_flags(tmp_path, demo_data[kind], steps=steps, seq=48, preset=preset,
                                       extra=["--learning_rate", "3e-3", *extra]))
        _check_weights(result, preset)
        return result

    first = run(pretrain, "pretrain", steps=6)
    assert first["losses"][-1][1] < first["losses"][0][1] - 0.3, first["losses"]
    assert first["model"].config.aux_loss_scope == "batch"
    full_sft = run(sft, "sft", extra=["--from_weight", "pretrain"])["weights_path"]
    # minimind-3's LoRA targets are its square linears, q_proj and o_proj (768 x 768); at head dim 24 they are not
    # square here, so they are named
    adapter = lora.main(tiny_flags(tmp_path, demo_data["sft"], steps=3, seq=48, preset=preset,
                                   extra=["--from_weight", full_sft, "--lora_rank", "4", "--lora_name", "m3",
                                          "--lora_targets", "q_proj,o_proj"]))
    assert all(math.isfinite(loss) for _, loss in adapter["losses"])
    adapted = torch.load(adapter["weights_path"], weights_only=True)
    assert {k.split(".")[4] for k in adapted} == {"q_proj", "o_proj"}
    run(dpo, "dpo", extra=["--from_weight", full_sft, "--beta", "0.15"])
    run(distill, "sft", extra=["--from_weight", full_sft, "--teacher_weight", full_sft])
    run(reason, "reason", extra=["--from_weight", full_sft])
    loaded = load_model(full_sft)
    assert loaded.config.qk_norm and loaded.config.head_dim == 24
    with pytest.raises(engine.ConfigError, match="qk_norm 1, minimind-3's q/k path"):  # without --preset minimind3
        sft.main(tiny_flags(tmp_path / "m2", demo_data["sft"], steps=1, extra=["--from_weight", full_sft]))


def test_triton_trains_minimind3_moe_like_torch(demo_data, tmp_path):  # noqa: F811
    """Two pretrain steps of a 1-layer model on each backend from the same seed: the same losses (fp32; summation
    order only), so the first step's gradients agree too."""
    losses = {}
    for kernels in ("torch", "triton"):
        result = pretrain.main(tiny_flags(tmp_path / kernels, demo_data["pretrain"], steps=2, batch_size=2, seq=16,
                                          kernels=kernels, preset="minimind3-moe",
                                          extra=["--learning_rate", "1e-2", "--num_hidden_layers", "1"]))
        losses[kernels] = [loss for _, loss in result["losses"]]
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-4)
