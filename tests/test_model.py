import math

import pytest
import torch

from kernels import reference
from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.model import MoEFeedForward


def tiny(use_moe=False, **kw):
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=97, max_position_embeddings=128, use_moe=use_moe, **kw)


@pytest.mark.parametrize("preset,count", [("small", 25_829_888), ("base", 104_030_976), ("moe", 145_029_760)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset))
    assert model.num_parameters() == count


def test_intermediate_size_rule_and_overrides():
    assert [MiniMindConfig.from_preset(p).intermediate_size for p in ("small", "moe", "base")] == [1408, 1728, 2048]
    cfg = MiniMindConfig.from_preset("small", num_hidden_layers=2, rope_theta=1e4)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.rope_theta) == (512, 2, 1e4)
    with pytest.raises(ValueError, match="unknown preset"):
        MiniMindConfig.from_preset("huge")
    with pytest.raises(ValueError, match="num_attention_heads"):
        MiniMindConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("use_moe", [False, True])
def test_shapes_and_loss(use_moe):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny(use_moe))
    ids = torch.randint(0, 97, (3, 10))
    out = model(ids)
    assert out.logits.shape == (3, 10, 97) and out.loss is None
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.ndim == 0
    # the loss is the mean next-token cross-entropy of the logits, plus the aux loss
    logits = model(ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert (out.aux_loss > 0) == use_moe


def test_labels_ignore_and_weights():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny())
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[:, :5] = -100
    weights = torch.ones(2, 9)
    weights[:, 7] = 10.0
    out = model(ids, labels=labels, loss_weights=weights, return_logits=True)
    logp = out.logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    w = weights[:, 1:] * (labels[:, 1:] != -100)
    torch.testing.assert_close(out.lm_loss, -(logp * w).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    lp, _ = model.token_logprobs(ids, labels)
    torch.testing.assert_close(lp[:, 1:], logp * (labels[:, 1:] != -100), rtol=1e-5, atol=1e-6)
    assert (lp[:, 0] == 0).all()


@pytest.mark.parametrize("use_moe", [False, True])
def test_causality(use_moe):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny(use_moe)).eval()
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("use_moe", [False, True])
def test_cached_decoding_equals_full_forward(use_moe):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny(use_moe)).eval()
    ids = torch.randint(0, 97, (2, 11))
    full = model(ids).logits
    out = model(ids[:, :6], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    out = model(ids[:, 6:8], past_key_values=cache, use_cache=True)  # a chunk of two with a cache
    steps.append(out.logits)
    cache = out.past_key_values
    for t in range(8, 11):  # then one token at a time
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_padding_mask_left_padded_batch():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny()).eval()
    ids = torch.randint(3, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], dim=1).long()
    # positions differ by the padding, so compare against the same sequence run with the same positions
    ref = model(padded, attention_mask=torch.ones_like(mask)).logits
    out = model(padded, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[:, 3:], ref[:, 3:])  # the mask hides the pads
    # masking the pads must equal attending to real tokens only: compare with attention over the real keys
    sub = model(ids).logits  # same tokens, positions shifted by 3: rotary attention depends on relative positions
    torch.testing.assert_close(out[:, 3:], sub, rtol=1e-4, atol=1e-5)


def test_moe_routing_topk_and_weights():
    torch.manual_seed(0)
    cfg = tiny(True, n_routed_experts=4, num_experts_per_tok=2)
    moe = MoEFeedForward(cfg, reference)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(20, 64)
    idx, w, scores = moe.route(x)
    assert idx.shape == (20, 2) and (idx[:, 0] != idx[:, 1]).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(20))
    top = scores.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))


def test_moe_aux_loss_by_hand():
    torch.manual_seed(0)
    cfg = tiny(True, n_routed_experts=3, num_experts_per_tok=1, aux_loss_alpha=0.5)
    moe = MoEFeedForward(cfg, reference).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 4, 64)
    _, aux = moe(x)
    scores = torch.softmax(x.reshape(-1, 64) @ moe.gate.weight.T, -1).view(2, 4, 3)
    chosen = scores.argmax(-1)
    total = 0.0
    for b in range(2):
        for e in range(3):
            f = (chosen[b] == e).sum().item() * 3 / (4 * 1)
            total += f * scores[b, :, e].mean().item()
    torch.testing.assert_close(aux.item(), 0.5 * total / 2, rtol=1e-5, atol=1e-7)
    moe.eval()
    assert moe(x)[1].item() == 0.0


@pytest.mark.parametrize("use_moe", [False, True])
def test_state_dict_uses_minimind_keys_and_round_trips(use_moe):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny(use_moe)).eval()
    sd = model.state_dict()
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" in sd and "model.norm.weight" in sd
    for name in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight"):
        assert f"model.layers.1.{name}" in sd
    if use_moe:
        assert "model.layers.0.mlp.gate.weight" in sd
        for j in range(4):
            for p in ("gate", "up", "down"):
                assert f"model.layers.0.mlp.experts.{j}.{p}_proj.weight" in sd
        assert "model.layers.0.mlp.shared_experts.0.up_proj.weight" in sd
        assert not any("w_gate" in k for k in sd)
    else:
        assert "model.layers.0.mlp.gate_proj.weight" in sd
    # a MiniMind2-style checkpoint: fp16 tensors in plain dicts, saved and loaded strictly into a fresh model
    fp16 = {k: v.half().clone() for k, v in sd.items()}
    other = MiniMindForCausalLM(tiny(use_moe)).eval()
    other.load_state_dict(fp16, strict=True)
    ids = torch.randint(0, 97, (2, 8))
    model.load_state_dict(fp16, strict=True)
    torch.testing.assert_close(other(ids).logits, model(ids).logits)
    assert other.lm_head.weight is other.model.embed_tokens.weight
    bad = dict(fp16)
    bad.pop("model.norm.weight")
    with pytest.raises(RuntimeError, match="model.norm.weight"):
        other.load_state_dict(bad, strict=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_dtypes_on_cpu(dtype):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny(True)).to(dtype)
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_yarn_scaling_changes_long_range_only():
    from minimind.model import rope_tables
    cos, sin = rope_tables(64, 64, 1e6)
    ycos, ysin = rope_tables(64, 64, 1e6, {"factor": 4, "original_max_position_embeddings": 2048})
    mscale = 0.1 * torch.log(torch.tensor(4.0)) + 1
    # the fastest-rotating dim is kept (up to the attention scale), the slowest is interpolated by the factor
    torch.testing.assert_close(ycos[:, 0], cos[:, 0] * mscale)
    torch.testing.assert_close(ysin[5, 31], torch.sin(torch.tensor(5 * 1e6 ** (-62 / 64) / 4)) * mscale,
                               rtol=1e-4, atol=1e-7)


def minimind2_reference_state(cfg, seed):
    """The state dict MiniMind2's model holds when built right after torch.manual_seed(seed), rebuilt here with
    plain torch modules created in MiniMind2's order (its MiniMindModel, then lm_head), each keeping PyTorch's
    default initialisation: nn.Embedding normal(0, 1), nn.Linear and the MoE router kaiming_uniform_(a=sqrt(5)).
    The embedding is tied by assigning lm_head's weight to it, so the shared matrix is lm_head's."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    torch.manual_seed(seed)
    sd = {}
    nn = torch.nn

    def mlp(prefix):  # MiniMind2's FeedForward creates gate, down, up, in this order
        sd[f"{prefix}.gate_proj.weight"] = nn.Linear(H, I, bias=False).weight
        sd[f"{prefix}.down_proj.weight"] = nn.Linear(I, H, bias=False).weight
        sd[f"{prefix}.up_proj.weight"] = nn.Linear(H, I, bias=False).weight

    nn.Embedding(V, H)  # model.embed_tokens, replaced by the tie below
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for name, out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            sd[f"{p}.self_attn.{name}_proj.weight"] = nn.Linear(H, out, bias=False).weight
        sd[f"{p}.self_attn.o_proj.weight"] = nn.Linear(q_out, H, bias=False).weight
        sd[f"{p}.input_layernorm.weight"] = torch.ones(H)
        sd[f"{p}.post_attention_layernorm.weight"] = torch.ones(H)
        if cfg.use_moe:
            for j in range(cfg.n_routed_experts):
                mlp(f"{p}.mlp.experts.{j}")
            router = torch.empty(cfg.n_routed_experts, H)
            nn.init.kaiming_uniform_(router, a=math.sqrt(5))
            sd[f"{p}.mlp.gate.weight"] = router
            for j in range(cfg.n_shared_experts):
                mlp(f"{p}.mlp.shared_experts.{j}")
        else:
            mlp(f"{p}.mlp")
    sd["model.norm.weight"] = torch.ones(H)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] = nn.Linear(H, V, bias=False).weight
    return {k: v.detach() for k, v in sd.items()}


@pytest.mark.parametrize("use_moe", [False, True])
def test_minimind2_init_is_minimind2s_initial_state(use_moe):
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, use_moe=use_moe)
    for seed in (1337, 7):
        want = minimind2_reference_state(cfg, seed)
        torch.manual_seed(123)  # the global generator's state does not matter: the seed does
        got = MiniMindForCausalLM(cfg).init_minimind2_(seed).state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert got["lm_head.weight"].abs().max() <= 1 / 64 ** 0.5  # uniform, not normal(0, 0.02): a real change
    assert got["lm_head.weight"].std() > 0.5 / 64 ** 0.5
