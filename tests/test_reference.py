"""kernels/reference.py checked against definitions written out here, independently of it: the parity tests compare
every kernel with the reference, so a mistake in the reference (the z-loss term, the MoE combine, RoPE) would pass
them. Float64 definitions; the reference computes in float32 (its outputs are compared at 1e-5 relative)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import get_backend
from kernels import reference as ref
from minimind.model import rope_tables

TOL = 1e-5


def rel(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def backends():
    """torch (the reference), and triton where it runs (under the interpreter on a CPU)."""
    names = ["torch"]
    try:
        get_backend("triton")
        names.append("triton")
    except RuntimeError:
        pass
    return names


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_z_loss_is_z_times_lse_squared_scaled_by_the_token_weight(backend, reduction):
    """loss_i = w_i * (cross_entropy_i + z * logsumexp(logits_i)^2), 0 on ignored tokens; "mean" divides by the
    weight of the non-ignored tokens. The token weight scales the z-loss term too (Liger's leaves it unweighted).
    Cross-entropy from F.cross_entropy, the z term by hand, in float64; forward and both gradients."""
    g = torch.Generator().manual_seed(0)
    N, H, V, z = 24, 16, 300, 1e-2
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5  # logits of std 2: lse ~ 8, so z * lse^2 ~ 0.6 is no rounding
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    token_weights = torch.rand(N, generator=g) * 2 + 0.1
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = h64 @ w64.t()
    valid = labels != -100
    per_token = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none") \
        + z * torch.logsumexp(logits, dim=-1) ** 2
    per_token = torch.where(valid, token_weights.double() * per_token, 0.0)
    want = {"none": per_token, "sum": per_token.sum(),
            "mean": per_token.sum() / (token_weights.double() * valid).sum()}[reduction]
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = get_backend(backend).linear_cross_entropy(h32, w32, labels, token_weights=token_weights,
                                                   reduction=reduction, z_loss=z)
    assert rel(got, want) < TOL, f"{backend} {reduction}: loss off by {rel(got, want):.3g}"
    grad_out = torch.randn(got.shape, generator=g)
    for name, a, b in zip(("hidden", "weight"), torch.autograd.grad(got, (h32, w32), grad_out),
                          torch.autograd.grad(want, (h64, w64), grad_out.double())):
        assert rel(a, b) < TOL, f"{backend} {reduction}: grad {name} off by {rel(a, b):.3g}"
    # and the z term is really there: without it the loss is plain weighted cross-entropy, visibly smaller
    plain = get_backend(backend).linear_cross_entropy(hidden, weight, labels, token_weights=token_weights,
                                                     reduction=reduction)
    assert (got - plain).abs().max() > 0.1


def moe_by_hand(x, topk_idx, topk_weight, w_gate, w_up, w_down):
    """y_n = sum_k topk_weight[n, k] * (silu(x_n Wg_e^T) * (x_n Wu_e^T)) Wd_e^T with e = topk_idx[n, k], one token
    and one slot at a time."""
    rows = []
    for n in range(x.shape[0]):
        y = torch.zeros_like(x[n])
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[n, k])
            y = y + topk_weight[n, k] * ((F.silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n])) @ w_down[e].t())
        rows.append(y)
    return torch.stack(rows)


def test_moe_experts_reference_is_each_tokens_weighted_experts():
    """The reference's gather / per-expert loop / combine against the sum written per token: 4 experts, top-2, one
    expert that no token picks, one token whose two slots pick the same expert; output and every gradient."""
    g = torch.Generator().manual_seed(1)
    N, H, I, E, K = 11, 12, 20, 4, 2
    inputs = dict(x=torch.randn(N, H, generator=g), topk_weight=torch.rand(N, K, generator=g) + 0.1,
                  w_gate=torch.randn(E, I, H, generator=g) / H ** 0.5,
                  w_up=torch.randn(E, I, H, generator=g) / H ** 0.5,
                  w_down=torch.randn(E, H, I, generator=g) / I ** 0.5)
    topk_idx = torch.rand(N, 3, generator=g).argsort(dim=1)[:, :K]  # experts 0-2 only: expert 3 gets no token
    topk_idx[4] = torch.tensor([1, 1])
    leaves32 = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    leaves64 = {k: v.double().requires_grad_() for k, v in inputs.items()}
    args = ("x", "topk_weight", "w_gate", "w_up", "w_down")
    got = ref.moe_experts(leaves32["x"], topk_idx, *(leaves32[k] for k in args[1:]))
    want = moe_by_hand(leaves64["x"], topk_idx, *(leaves64[k] for k in args[1:]))
    assert got.dtype == torch.float32 and rel(got, want) < TOL, f"output off by {rel(got, want):.3g}"
    grad_out = torch.randn(N, H, generator=g)
    got.backward(grad_out)
    want.backward(grad_out.double())
    for k in args:
        err = rel(leaves32[k].grad, leaves64[k].grad)
        assert err < TOL, f"grad {k} off by {err:.3g}"
    assert leaves32["w_gate"].grad[3].abs().max() == 0  # the expert no token chose


def test_rope_reference_rotates_pairs_and_depends_only_on_relative_position():
    """With MiniMind's tables the reference rotates each pair (x_i, x_{i + D/2}) by the angle of position p: the
    pair's length is kept, and a rotated q at position m dotted with a rotated k at position n depends on m - n
    only."""
    g = torch.Generator().manual_seed(2)
    D, T = 16, 12
    cos, sin = rope_tables(D, 2 * T)
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64).expand(1, T, 1, D)  # one vector at every position
    k = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64).expand(1, T, 1, D)
    def pair_length(x):
        return x[..., :D // 2] ** 2 + x[..., D // 2:] ** 2

    for offset in (0, 5):
        rq, rk = ref.rope(q, k, cos.double(), sin.double(), offset)
        torch.testing.assert_close(pair_length(rq), pair_length(q), rtol=1e-6, atol=1e-6)
        scores = torch.einsum("md,nd->mn", rq[0, :, 0], rk[0, :, 0])
        for shift in range(-3, 4):  # every (m, m - shift) pair on one diagonal gives the same score
            diagonal = torch.diagonal(scores, offset=-shift)
            torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-6, atol=1e-6)


def test_rope_reference_rejects_an_odd_head_dim():
    """An odd D has no halves to rotate into each other (the Triton kernel refuses it too)."""
    q, k = torch.randn(1, 4, 2, 7), torch.randn(1, 4, 1, 7)
    cos, sin = torch.randn(4, 7), torch.randn(4, 7)
    with pytest.raises(ValueError, match="kernels/reference.py: rope needs an even head dim, got 7"):
        ref.rope(q, k, cos, sin)
