import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.lora import (LoRALinear, apply_lora, attach_lora, load_lora, lora_layers, lora_parameters, lora_state_dict,
                           merge_lora, remove_lora, unmerge_lora)


def tiny(use_moe=False):
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=97, max_position_embeddings=128, use_moe=use_moe)


def adapted(seed=0, rank=4, alpha=None, targets="square", use_moe=False):
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny(use_moe)).eval()
    names = apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    for p in lora_parameters(model):  # B starts at 0: give it values so the adapter does something
        torch.nn.init.normal_(p, std=0.05)
    return model, names


def test_default_targets_are_minimind2_square_layers_and_keys_stay():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny())
    base_keys = set(model.state_dict())
    names = apply_lora(model, rank=4)
    # hidden 64 with 4 query / 2 kv heads: q_proj and o_proj are 64x64, k/v are 32x64, the MLP is not square
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj"))
    sd = model.state_dict()
    assert base_keys <= set(sd)
    assert set(sd) - base_keys == {f"{n}.lora.{ab}.weight" for n in names for ab in "AB"}
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    assert layer.lora.A.weight.shape == (4, 64) and layer.lora.B.weight.shape == (64, 4)
    assert (layer.lora.B.weight == 0).all()
    assert 0.015 < layer.lora.A.weight.std().item() < 0.025  # N(0, 0.02), 256 samples
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora.{ab}.weight" for n in names for ab in "AB"}


@pytest.mark.parametrize("use_moe", [False, True])
def test_all_targets_and_named_targets(use_moe):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny(use_moe))
    names = apply_lora(model, rank=2, targets="all")
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} == leaves
    assert not any(n == "lm_head" or n.endswith("mlp.gate") for n in names)
    model = MiniMindForCausalLM(tiny(use_moe))
    assert {n.rsplit(".", 1)[-1] for n in apply_lora(model, 2, targets="q_proj, v_proj")} == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, 2)
    with pytest.raises(ValueError, match="match no linear"):
        apply_lora(MiniMindForCausalLM(tiny()), 2, targets="q_proj,nonexistent")


def test_zero_b_leaves_model_unchanged_and_forward_matches_formula():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny()).eval()
    ids = torch.randint(0, 97, (2, 9))
    before = model(ids).logits
    apply_lora(model, rank=4, alpha=8)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # B = 0: exactly the base model
    layer = model.model.layers[1].self_attn.o_proj
    torch.nn.init.normal_(layer.lora.B.weight)
    x = torch.randn(5, 64)
    expected = x @ layer.weight.T + 2.0 * (x @ layer.lora.A.weight.T) @ layer.lora.B.weight.T  # s = 8 / 4
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # fp32, two matmul orders


@pytest.mark.parametrize("alpha", [None, 16])
def test_merge_unmerge_round_trip(alpha):
    model, _ = adapted(alpha=alpha)
    ids = torch.randint(0, 97, (2, 9))
    base_w = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    adapted_logits = model(ids).logits
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    # merged weights give the same outputs; fp32 sums in a different order, so a float-rounding tolerance
    torch.testing.assert_close(model(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for n, m in lora_layers(model).items():  # W + D - D: at most one rounding of |W| + |D| per element
        torch.testing.assert_close(m.weight, base_w[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_remove_lora_gives_plain_minimind_keys():
    model, _ = adapted()
    ids = torch.randint(0, 97, (2, 9))
    adapted_logits = model(ids).logits
    remove_lora(model, merge=True)
    assert not lora_layers(model) and not any(".lora." in k for k in model.state_dict())
    fresh = MiniMindForCausalLM(tiny()).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [None, 32])
def test_adapter_file_round_trip_reproduces_outputs(tmp_path, alpha):
    model, names = adapted(seed=0, alpha=alpha)
    ids = torch.randint(0, 97, (2, 9))
    want = model(ids).logits
    sd = lora_state_dict(model)
    assert set(sd) == {f"{n}.lora.{ab}.weight" for n in names for ab in "AB"}
    torch.save(sd, tmp_path / "adapter.pth")
    # the same base weights (same seed), fresh adapters, then the file
    torch.manual_seed(0)
    other = MiniMindForCausalLM(tiny()).eval()
    apply_lora(other, rank=4, alpha=alpha)
    assert not torch.allclose(other(ids).logits, want)
    load_lora(other, torch.load(tmp_path / "adapter.pth"))
    torch.testing.assert_close(other(ids).logits, want, rtol=1e-5, atol=1e-6)
    # or onto a plain base model: attach_lora reads the layers and the rank off the file
    torch.manual_seed(0)
    plain = MiniMindForCausalLM(tiny()).eval()
    assert attach_lora(plain, torch.load(tmp_path / "adapter.pth")) == sorted(names)
    torch.testing.assert_close(plain(ids).logits, want, rtol=1e-5, atol=1e-6)
    # a file means delta_W = B @ A whatever alpha was (MiniMind2's convention, scale 1)
    layer = lora_layers(model)[names[0]]
    delta = sd[f"{names[0]}.lora.B.weight"] @ sd[f"{names[0]}.lora.A.weight"]
    torch.testing.assert_close(delta, layer.scaling * layer.lora.B.weight @ layer.lora.A.weight)


def test_load_lora_errors():
    model, names = adapted()
    sd = lora_state_dict(model)
    bad = dict(sd)
    bad.pop(f"{names[0]}.lora.A.weight")
    with pytest.raises(ValueError, match="missing"):
        load_lora(model, bad)
    with pytest.raises(ValueError, match="rank"):
        other, _ = adapted(rank=2)
        load_lora(other, sd)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora(MiniMindForCausalLM(tiny()), sd)


def test_only_adapters_receive_gradients():
    model, _ = adapted()
    model.train()
    ids = torch.randint(0, 97, (2, 9))
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora." in n), n


# ------------------------------------------------------------------------------------------ the train.lora stage
TINY_FLAGS = ["--hidden_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "4",
              "--num_key_value_heads", "2", "--device", "cpu", "--dtype", "fp32", "--log_interval", "1"]


def _base_checkpoint(tmp_path, vocab_size):
    torch.manual_seed(1)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=vocab_size)
    base = MiniMindForCausalLM(cfg)
    path = tmp_path / "base.pth"
    torch.save({k: v.half() for k, v in base.state_dict().items()}, path)  # a MiniMind2-style fp16 weight file
    base.load_state_dict(torch.load(path))
    return cfg, base.eval(), path


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_lora_stage_trains_only_adapters(tmp_path, kernels):
    from minimind.data import build_loader
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    from train import lora as lora_stage

    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=64, dpo=10, reason=10))
    cfg, base, base_path = _base_checkpoint(tmp_path, tok.vocab_size)
    # the interpreter is slow: the triton run takes 2 smaller steps at a higher learning rate
    steps, seq, bs, lr = (8, 48, 8, "1e-2") if kernels == "torch" else (2, 40, 2, "3e-2")
    argv = TINY_FLAGS + ["--kernels", kernels, "--data_path", str(data["sft"]), "--from_weight", str(base_path),
                         "--out_dir", str(tmp_path / "out"), "--max_seq_len", str(seq), "--batch_size", str(bs),
                         "--epochs", "1", "--max_steps", str(steps), "--learning_rate", lr,
                         "--lora_name", "demo", "--lora_rank", "4"]
    result = lora_stage.main(argv)
    trained = result["model"].eval()
    trained.set_kernels("torch")  # evaluate on the reference ops (faster than the interpreter)
    # the adapter file: MiniMind2 keys, only the adapters, where MiniMind2 puts it
    path = tmp_path / "out" / "lora" / "demo_64.pth"
    assert result["weights_path"] == str(path)
    sd = torch.load(path)
    assert sd and all(".lora.A.weight" in k or ".lora.B.weight" in k for k in sd)
    assert {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in sd} == {"q_proj", "o_proj"}
    # only adapters changed
    trained_sd = trained.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(trained_sd[k], v), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in sd.items() if k.endswith("B.weight"))
    # the loss on a fixed batch went down
    batch = next(iter(build_loader("sft", data["sft"], tok, max_seq_len=seq, batch_size=bs)))
    with torch.no_grad():
        before = base(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"]).loss
        after = trained(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"]).loss
    losses = [loss for _, loss in result["losses"]]
    print(f"lora[{kernels}] fixed-batch loss {before.item():.4f} -> {after.item():.4f}; step losses {losses}")
    assert after < before
    if kernels == "torch":
        assert losses[-1] < losses[0]
    # a fresh base model + apply_lora + the file reproduces the trained model's outputs
    _, fresh, _ = _base_checkpoint(tmp_path, tok.vocab_size)
    apply_lora(fresh, rank=4)
    load_lora(fresh, sd)
    ids = batch["input_ids"][:2, :16]
    torch.testing.assert_close(fresh.eval()(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)
    merge_lora(fresh)
    torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-5)  # fp32 re-association


def test_lora_stage_flops_count_no_weight_gradients_for_the_frozen_base():
    from train import engine
    from train.lora import flops_per_token
    model = MiniMindForCausalLM(tiny())
    full = engine.default_flops_per_token(model, 32)
    apply_lora(model, rank=4)
    n_adapter = sum(p.numel() for p in lora_parameters(model))
    n_base = engine.matmul_params(model) - n_adapter
    assert flops_per_token(model, 32) == full - 2 * n_base + 6 * n_adapter


def test_lora_stage_resume_reproduces_the_uninterrupted_adapter(tmp_path):
    from minimind.demo import write_demo_data
    from minimind.tokenizer import load_tokenizer
    from train import lora as lora_stage

    tok = load_tokenizer()
    data = write_demo_data(tmp_path / "data", sizes=dict(pretrain=10, sft=32, dpo=10, reason=10))
    _, _, base_path = _base_checkpoint(tmp_path, tok.vocab_size)
    argv = TINY_FLAGS + ["--data_path", str(data["sft"]), "--from_weight", str(base_path), "--max_seq_len", "48",
                         "--batch_size", "4", "--epochs", "1", "--max_steps", "4", "--learning_rate", "1e-2",
                         "--lora_rank", "4"]
    whole = lora_stage.main(argv + ["--out_dir", str(tmp_path / "a")])
    first = lora_stage.main(argv + ["--out_dir", str(tmp_path / "b"), "--stop_after", "2"])
    assert first["interrupted"] and first["steps"] == 2
    # the resume state sits beside its adapter, named after it: two adapters in one out_dir never share one
    assert first["resume_path"] == str(tmp_path / "b" / "lora" / "lora_identity_64_resume.pt")
    second = lora_stage.main(argv + ["--out_dir", str(tmp_path / "b"), "--from_resume", "1"])
    assert second["steps"] == 4
    a, b = torch.load(whole["weights_path"]), torch.load(second["weights_path"])
    assert a.keys() == b.keys()
    for k in a:  # CPU, fp32, same batches and RNG: bit for bit
        assert torch.equal(a[k], b[k]), k
