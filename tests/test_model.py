import pytest
import torch

from kernels import reference
from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.kv_cache import KVCache
from minimind.model import MoEFeedForward


def tiny(use_moe=False, **kw):
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=97, max_position_embeddings=128, use_moe=use_moe, **kw)


def tiny3(use_moe=False, **kw):
    """minimind-3's structure at toy size: q/k norm, 8 q / 4 kv heads of 16 (not hidden / heads = 6), the pi MLP
    rule, eps 1e-6, and for MoE 4 routed experts, top-1, no shared expert, the batch-level aux loss."""
    shape = dict(hidden_size=48, num_hidden_layers=2, head_dim=16, vocab_size=97, max_position_embeddings=128)
    return MiniMindConfig.from_preset("minimind3", **{**shape, "use_moe": use_moe, **kw})


KINDS = {"minimind2": tiny, "minimind2-moe": lambda: tiny(True), "minimind3": tiny3,
         "minimind3-moe": lambda: tiny3(True)}


@pytest.mark.parametrize("preset,count", [("small", 25_829_888), ("base", 104_030_976), ("moe", 145_029_760),
                                          ("minimind3", 63_912_192), ("minimind3-moe", 198_416_640)])
def test_preset_parameter_counts(preset, count):
    with torch.device("meta"):
        model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset))
    assert model.num_parameters() == count


def test_minimind3_presets_and_their_rules_under_overrides():
    dense, moe = MiniMindConfig.from_preset("minimind3"), MiniMindConfig.from_preset("minimind3-moe")
    assert (dense.head_dim, dense.intermediate_size, dense.num_key_value_heads) == (96, 2432, 4)
    assert dense.rms_norm_eps == 1e-6
    assert dense.qk_norm and not dense.use_moe and moe.use_moe
    assert (moe.n_routed_experts, moe.n_shared_experts, moe.num_experts_per_tok) == (4, 0, 1)
    assert (moe.aux_loss_scope, moe.aux_loss_alpha) == ("batch", 5e-4)
    # another width keeps minimind-3's MLP rule (64 * ceil(hidden * pi / 64)) and head_dim follows hidden / heads
    cfg = MiniMindConfig.from_preset("minimind3", hidden_size=512)
    assert (cfg.intermediate_size, cfg.head_dim) == (1664, 64)
    assert MiniMindConfig.from_preset("small", hidden_size=768).intermediate_size == 2048  # MiniMind2's rule
    # head_dim is its own field: the projections and the RoPE tables follow it, not hidden / heads
    model = MiniMindForCausalLM(tiny3())
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (8 * 16, 48) and attn.k_proj.weight.shape == (4 * 16, 48)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)
    assert model.model.rope_cos.shape == (128, 16)
    with pytest.raises(ValueError, match="head_dim must be even"):
        tiny3(head_dim=15)
    with pytest.raises(ValueError, match="aux_loss_scope"):
        tiny3(aux_loss_scope="token")


def test_intermediate_size_rule_and_overrides():
    assert [MiniMindConfig.from_preset(p).intermediate_size for p in ("small", "moe", "base")] == [1408, 1728, 2048]
    cfg = MiniMindConfig.from_preset("small", num_hidden_layers=2, rope_theta=1e4)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.rope_theta) == (512, 2, 1e4)
    with pytest.raises(ValueError, match="unknown preset"):
        MiniMindConfig.from_preset("huge")
    with pytest.raises(ValueError, match="num_attention_heads"):
        MiniMindConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_loss(kind):
    torch.manual_seed(0)
    use_moe = kind.endswith("moe")
    model = MiniMindForCausalLM(KINDS[kind]())
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


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(KINDS[kind]()).eval()
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def logits_through_the_cache(model, seqs, prompt_lengths):
    """The logits of every position of each sequence in seqs (lists of ids, each with the same number of tokens after
    its prompt) as generation computes them: all prompts in one right-padded prefill into a KVCache, then one token
    per row per step, every row at its own position. Returns one (len, V) tensor per sequence."""
    device = next(model.parameters()).device
    cache = KVCache(model.config, len(seqs), max(len(s) for s in seqs), next(model.parameters()).dtype, device)
    prompts = torch.zeros(len(seqs), max(prompt_lengths), dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, prompt_lengths)):
        prompts[b, :n] = torch.tensor(s[:n])
    cache.prefill(0, prompt_lengths)
    hidden = model.model(prompts.to(device), cache=cache)[0]
    out = [[hidden[b, :n]] for b, n in enumerate(prompt_lengths)]
    for step in range(len(seqs[0]) - prompt_lengths[0]):
        cache.decode(len(seqs))
        ids = torch.tensor([[s[n + step]] for s, n in zip(seqs, prompt_lengths)], device=device)
        hidden = model.model(ids, cache=cache)[0]
        for b in range(len(seqs)):
            out[b].append(hidden[b])
    return [model.lm_head(torch.cat(h)) for h in out]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_forward(kind):
    """Rows of different lengths through the KV cache give each row's own full forward."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(KINDS[kind]()).eval()
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (11, 7, 9)]
    with torch.no_grad():
        got = logits_through_the_cache(model, seqs, [6, 2, 4])  # then 5 decode steps
        for s, logits in zip(seqs, got):
            torch.testing.assert_close(logits, model(torch.tensor([s])).logits[0], rtol=1e-4, atol=1e-5)


def test_kv_cache_bad_use():
    model = MiniMindForCausalLM(tiny()).eval()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KVCache(model.config, 2, 129)
    cache = KVCache(model.config, 2, 8)
    with pytest.raises(ValueError, match="does not fit"):
        cache.prefill(1, [3, 3])  # rows 1..2 of 2
    with pytest.raises(ValueError, match="does not fit"):
        cache.prefill(0, [9])
    cache.prefill(0, [8, 2])
    with pytest.raises(ValueError, match="does not fit"):
        cache.decode(1)  # row 0 is full
    cache.prefill(0, [2, 2])
    with torch.no_grad():
        model.model(torch.ones(2, 2, dtype=torch.long), cache=cache)
        with pytest.raises(RuntimeError, match="needs prefill"):  # one forward per prefill / decode
            model.model(torch.ones(2, 1, dtype=torch.long), cache=cache)
        cache.decode(2)
        with pytest.raises(RuntimeError, match="one token per row"):
            model.model(torch.ones(2, 2, dtype=torch.long), cache=cache)


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


def test_top1_renormalised_weight_is_exactly_one_with_no_gradient():
    """minimind-3's top-1 with norm_topk_prob: w / w = 1, so the router learns from the aux loss alone (autograd of
    w / w would leave rounding noise as large as the aux loss's gradient); norm_topk_prob off keeps the score."""
    torch.manual_seed(0)
    moe = MoEFeedForward(tiny3(True), reference)
    x = torch.randn(20, 48)
    idx, w, scores = moe.route(x)
    assert idx.shape == (20, 1) and torch.equal(w, torch.ones(20, 1)) and not w.requires_grad
    moe.norm_topk = False
    torch.testing.assert_close(moe.route(x)[1], scores.max(-1, keepdim=True).values)


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


# ------------------------------------------------------------------------------- minimind-3 against its spec, by hand

def _spec_rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _spec_rope(x, T, theta):
    """x (T, heads, D): rotate-half RoPE with tables built here for D = x's last dim."""
    D = x.shape[-1]
    angles = torch.outer(torch.arange(T, dtype=torch.float64),
                         1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin


def _spec_swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def minimind3_by_the_spec(sd, ids, layers, heads, kv_heads, experts, eps=1e-6, theta=1e6, alpha=5e-4):
    """minimind-3's forward for one sequence, written from minimind3-spec.md alone, in float64 on a state dict with
    minimind-3's key names: (logits (T, V), aux loss summed over the layers)."""
    sd = {k: v.double() for k, v in sd.items()}
    x, T, aux = sd["model.embed_tokens.weight"][ids], len(ids), 0.0
    for i in range(layers):
        p = f"model.layers.{i}."
        h = _spec_rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        D = sd[p + "self_attn.q_norm.weight"].shape[0]
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(T, heads, D)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(T, kv_heads, D)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(T, kv_heads, D)
        q = _spec_rope(_spec_rms_norm(q, sd[p + "self_attn.q_norm.weight"], eps), T, theta)  # q/k norm, then RoPE
        k = _spec_rope(_spec_rms_norm(k, sd[p + "self_attn.k_norm.weight"], eps), T, theta)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)  # GQA
        scores = torch.einsum("thd,shd->hts", q, k) / D ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, heads * D)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        h = _spec_rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if experts:
            scores = (h @ sd[p + "mlp.gate.weight"].T).softmax(-1)  # (T, E)
            top = scores.argmax(-1)
            weight = scores.max(-1).values / scores.max(-1).values  # top-1, renormalised (norm_topk_prob)
            mlp = torch.stack([_spec_swiglu(h[t], *(sd[f"{p}mlp.experts.{int(top[t])}.{n}_proj.weight"]
                                                    for n in ("gate", "up", "down"))) for t in range(T)])
            x = x + weight[:, None] * mlp
            load = torch.nn.functional.one_hot(top, experts).double().mean(0)
            aux = aux + experts * (load * scores.mean(0)).sum() * alpha
        else:
            x = x + _spec_swiglu(h, *(sd[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
    x = _spec_rms_norm(x, sd["model.norm.weight"], eps)
    return x @ sd["model.embed_tokens.weight"].T, aux


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_minimind3_weights_load_strictly_and_give_the_spec_logits_and_aux_loss(use_moe):
    """A state dict with minimind-3's key names (q_norm, k_norm; experts without shared_experts), filled with random
    values (norm weights too), loads strictly; logits and aux loss match the spec's formulas written above."""
    g = torch.Generator().manual_seed(3)
    H, L, V, D, I, E = 48, 2, 97, 16, 192, 4
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (8 * D, H), p + "self_attn.k_proj.weight": (4 * D, H),
                       p + "self_attn.v_proj.weight": (4 * D, H), p + "self_attn.o_proj.weight": (H, 8 * D),
                       p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
        mlps = [f"mlp.experts.{j}." for j in range(E)] if use_moe else ["mlp."]
        for m in mlps:
            shapes.update({p + m + "gate_proj.weight": (I, H), p + m + "up_proj.weight": (I, H),
                           p + m + "down_proj.weight": (H, I)})
        if use_moe:
            shapes[p + "mlp.gate.weight"] = (E, H)
    sd = {k: (1 + 0.3 * torch.randn(s, generator=g)) if len(s) == 1 else 0.15 * torch.randn(s, generator=g)
          for k, s in shapes.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model = MiniMindForCausalLM(tiny3(use_moe))
    model.load_state_dict({k: v.half() for k, v in sd.items()}, strict=True)  # a minimind-3 file is fp16
    sd = {k: v.half().float() for k, v in sd.items()}
    assert set(model.state_dict()) == set(sd)  # and saves under the same names
    ids = torch.randint(0, V, (13,), generator=g)
    want, want_aux = minimind3_by_the_spec(sd, ids, L, 8, 4, E if use_moe else 0)
    out = model.train()(ids[None], labels=ids[None], return_logits=True)
    torch.testing.assert_close(out.logits[0].double(), want, rtol=1e-5, atol=1e-5)
    if use_moe:
        assert want_aux > 0
        torch.testing.assert_close(out.aux_loss.double(), want_aux, rtol=1e-5, atol=0)
    else:
        assert out.aux_loss.item() == 0
