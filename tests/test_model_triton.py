"""The whole model on the Triton kernels against the torch reference: a tiny dense MiniMind2 and a tiny minimind-3
(q/k norm, 8 q / 4 kv heads of 24, which is not hidden / heads) in float32, same weights, same batch. Loss, logits and every parameter gradient agree to a relative error under 1e-4 (float32 throughout;
only summation orders differ, compounded over two layers)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from minimind.config import MiniMindConfig  # noqa: E402
from minimind.model import MiniMindForCausalLM, RMSNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4


def tiny_config(kind):
    if kind == "minimind3":
        return MiniMindConfig.from_preset("minimind3", hidden_size=64, num_hidden_layers=2, head_dim=24,
                                          vocab_size=101, max_position_embeddings=64)
    return MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          vocab_size=101, max_position_embeddings=64)


KINDS = ("minimind2", "minimind3")


def model_pair(kind):
    torch.manual_seed(0)
    ref = MiniMindForCausalLM(tiny_config(kind), kernels="torch").to(DEVICE)
    tri = MiniMindForCausalLM(tiny_config(kind), kernels="triton").to(DEVICE)
    with torch.no_grad():  # non-unit norm weights, so a kernel that ignored them would show
        for m in ref.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def batch(B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (B, T), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def assert_grads_match(ref, tri):
    tri_params = dict(tri.named_parameters())
    for name, p in ref.named_parameters():
        assert p.grad is not None and tri_params[name].grad is not None, f"{name}: no gradient"
        assert rel(tri_params[name].grad, p.grad) < TOL, f"{name}: gradient relative error " \
                                                           f"{rel(tri_params[name].grad, p.grad):.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_logits_path_loss_and_every_gradient_match_torch(kind):
    """Without labels the model returns logits (no fused cross-entropy involved): rms_norm, add_rms_norm, rope (or
    qk_norm_rope) and swiglu carry the whole forward and backward."""
    ref, tri = model_pair(kind)
    ids, labels = batch()
    losses = []
    for model in (ref, tri):
        logits = model(ids).logits
        assert logits.shape == (2, 12, 101)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 101), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        losses.append(loss)
    assert rel(losses[1], losses[0]) < TOL
    assert_grads_match(ref, tri)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_matches_torch(kind):
    """Generation's path: a right-padded prefill into the KV cache, then one token per row at its own position (RoPE
    on per-token cos/sin rows)."""
    from tests.test_model import logits_through_the_cache
    ref, tri = model_pair(kind)
    ids, _ = batch(B=2, T=9, seed=2)
    seqs = [ids[0].tolist(), ids[1, :6].tolist()]
    with torch.no_grad():
        want, got = (logits_through_the_cache(model, seqs, [7, 4]) for model in (ref, tri))
        for w, g, s in zip(want, got, seqs):
            assert rel(g, w) < TOL
            assert rel(w, ref(torch.tensor([s], device=DEVICE)).logits[0]) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_labels_path_loss_and_every_gradient_match_torch(kind):
    """With labels the loss is the fused linear cross-entropy (kernels/linear_cross_entropy.py)."""
    ref, tri = model_pair(kind)
    ids, labels = batch()
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5
    losses = []
    for model in (ref, tri):
        out = model(ids, labels=labels, loss_weights=weights)
        assert out.logits is None
        out.loss.backward()
        losses.append(out.loss)
    assert rel(losses[1], losses[0]) < TOL
    assert_grads_match(ref, tri)
