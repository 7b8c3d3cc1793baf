"""Parity of the Triton fused linear cross-entropy / log-probabilities (kernels/linear_cross_entropy.py) with the
reference (kernels/reference.py): forward and the hidden and weight gradients. Compiled on CUDA with MiniMind sizes
(up to 4096 tokens); under the interpreter on CPU with tens to a couple of hundred tokens."""
from types import SimpleNamespace

import pytest
import torch

from kernels import get_backend, reference
from kernels import linear_cross_entropy as lce
from minimind import MiniMindConfig, MiniMindForCausalLM

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
MANY = 4096 if ON_GPU else 200  # the large token count of a case: compiled on a GPU, interpreted on a CPU
FEW = 512 if ON_GPU else 40


# Max error relative to the largest reference magnitude. fp32: same math, other summation order (seen ~1e-6).
# bf16 / fp16: logits and dlogits rounded to 8 / 11 mantissa bits vs an fp32 reference on the upcast inputs
# (seen up to 1e-2 / 8e-4; the reference itself run in bf16 / fp16 is off by 4e-3 / 4e-4).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def many(dtype):
    """MANY tokens, except for fp16 on a CPU, whose matmuls are ~10x slower than bf16's there."""
    return FEW if dtype == torch.float16 and not ON_GPU else MANY


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the wrapper allocates for the kernels starts as NaN, so an element left unwritten fails."""
    monkeypatch.setattr(lce, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                               device=device))


def assert_close(actual, expected, tol, what):
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: max error {err:.3g} of the largest magnitude {scale.item():.3g} > {tol}"


def make_inputs(N, H, V, dtype, seed, ignored="some", weighted=False, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    # logits of std ~2: a peaked, not uniform, softmax
    weight = (torch.randn(V, H, generator=g) * 2 / H ** 0.5).to(DEVICE, weight_dtype or dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    if ignored == "some":
        labels[torch.rand(N, generator=g) < 0.3] = -100
    elif ignored == "all":
        labels[:] = -100
    token_weights = None
    if weighted:
        token_weights = torch.ones(N)
        token_weights[torch.rand(N, generator=g) < 0.2] = 10.0  # the reasoning stage's weighting
        token_weights = token_weights.to(DEVICE)
    return hidden.requires_grad_(), weight.requires_grad_(), labels.to(DEVICE), token_weights


def run_both(fn_name, hidden, weight, labels, grad_seed=0, **kw):
    """(output, grad_hidden, grad_weight) of the Triton op and of the fp32 reference on the upcast inputs, with
    a random grad_output."""
    results = []
    for fn, h, w in ((getattr(lce, fn_name), hidden, weight),
                     (getattr(reference, fn_name), hidden.detach().float().requires_grad_(),
                      weight.detach().float().requires_grad_())):
        out = fn(h, w, labels, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(DEVICE)
        results.append((out, *torch.autograd.grad(out, (h, w), g)))
    return results


def check_against_reference(N, H, V, dtype, seed, fn_name="linear_cross_entropy", ignored="some", weighted=False,
                            **kw):
    hidden, weight, labels, tw = make_inputs(N, H, V, dtype, seed, ignored, weighted)
    if weighted:
        kw["token_weights"] = tw
    (out, gh, gw), (rout, rgh, rgw) = run_both(fn_name, hidden, weight, labels, grad_seed=seed, **kw)
    assert out.dtype == torch.float32 and gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    tol = TOL[dtype]
    assert_close(out, rout, tol, "output")
    assert_close(gh, rgh, tol, "grad hidden")
    assert_close(gw, rgw, tol, "grad weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("H", [512, 640, 768])
def test_minimind_shapes(H, reduction, dtype):
    check_against_reference(many(dtype) if H == 768 else FEW, H, 6400, dtype, seed=H, reduction=reduction,
                            weighted=reduction != "sum", z_loss=1e-4 if H == 640 else 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,ignored", [(1, "none"), (1, "all"), (37, "some"), (FEW + 3, "some"), (FEW, "all")])
def test_awkward_shapes(N, ignored, dtype):
    for reduction in ("mean", "sum", "none"):
        check_against_reference(N, 123, 6401, dtype, seed=N, ignored=ignored, reduction=reduction, weighted=True,
                                z_loss=1e-3)


def test_all_ignored_mean_is_zero_with_zero_gradients():
    hidden, weight, labels, _ = make_inputs(FEW, 64, 6400, torch.float32, seed=3, ignored="all")
    loss = lce.linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", [(1, 1024, 4), (4, 2048, 8), "gpu"], ids=["1x1024", "4x2048", "gpu-rule"])
@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["one-chunk", "chunks-of-7-rows"])
def test_blocks_and_chunks(config, chunk_rows, dtype, monkeypatch):
    """Vocab blocks smaller than the vocab (the online log-sum-exp loop), several rows per program, the GPU's own
    configuration, and token chunks that do not divide the tokens (29 rows at 7 rows' worth of bytes: 4 chunks of
    6 rows and one of 5), in fp32 and in bf16 (CPU and vocab 6400 defaults run one block and one chunk)."""
    rule = lce.cross_entropy_config
    monkeypatch.setattr(lce, "cross_entropy_config",
                        (lambda v: rule(v, tile=8192)) if config == "gpu" else (lambda v: config))
    if chunk_rows:
        monkeypatch.setattr(lce, "MAX_CHUNK_LOGITS_BYTES", chunk_rows * 6401 * dtype.itemsize)
    chunks = []
    rows = lce._cross_entropy_rows
    monkeypatch.setattr(lce, "_cross_entropy_rows", lambda logits, *a, **k: chunks.append(len(logits))
                        or rows(logits, *a, **k))
    for reduction in ("mean", "none"):
        check_against_reference(29, 80, 6401, dtype, seed=5, reduction=reduction, weighted=True, z_loss=1e-3)
    want = [6, 6, 6, 6, 5] if chunk_rows else [29]  # rows of the first launches: the chunks of one pass
    assert chunks[:len(want)] == want
    check_against_reference(29, 80, 1000, dtype, seed=6, fn_name="linear_logprobs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_logprobs(dtype):
    check_against_reference(many(dtype), 768, 6400, dtype, seed=11, fn_name="linear_logprobs")
    check_against_reference(23, 123, 6401, dtype, seed=12, fn_name="linear_logprobs")


@pytest.mark.parametrize("fn_name,kw", [("linear_cross_entropy", {}), ("linear_cross_entropy", {"reduction": "sum"}),
                                        ("linear_cross_entropy", {"reduction": "none"}), ("linear_logprobs", {})])
def test_gradient_accumulation_and_repeated_calls(fn_name, kw):
    """Two calls on the same inputs in one graph (grad_output 2 and 3), then a second backward on other hidden
    states: the gradients add up in .grad exactly as the reference's do."""
    grads = []
    for fn in (getattr(lce, fn_name), getattr(reference, fn_name)):
        hidden, weight, labels, _ = make_inputs(FEW, 96, 1000, torch.float32, seed=7)
        hidden2, _, labels2, _ = make_inputs(FEW, 96, 1000, torch.float32, seed=8)
        (2 * fn(hidden, weight, labels, **kw).sum() + 3 * fn(hidden, weight, labels, **kw).sum()).backward()
        fn(hidden2, weight, labels2, **kw).sum().backward()
        grads.append((hidden.grad, hidden2.grad, weight.grad))
    for what, a, b in zip(("hidden", "hidden2", "weight"), *grads):
        assert_close(a, b, TOL[torch.float32], f"accumulated grad {what}")


def test_only_the_gradients_asked_for(monkeypatch):
    hidden, weight, labels, _ = make_inputs(FEW, 64, 1000, torch.float32, seed=9)
    ref = reference.linear_cross_entropy(hidden, weight.detach(), labels)
    rgh, = torch.autograd.grad(ref, hidden)
    loss = lce.linear_cross_entropy(hidden, weight.detach(), labels)
    gh, = torch.autograd.grad(loss, hidden)
    assert_close(gh, rgh, TOL[torch.float32], "grad hidden with a frozen weight")
    with torch.no_grad():  # no gradient is computed: the kernel only reads the logits
        calls = []
        rows = lce._cross_entropy_rows
        monkeypatch.setattr(lce, "_cross_entropy_rows", lambda *a, **k: calls.append(a[-1]) or rows(*a, **k))
        assert_close(lce.linear_cross_entropy(hidden, weight, labels), ref, TOL[torch.float32], "no_grad loss")
        assert calls == [None]


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_autocast(hidden_dtype, monkeypatch):
    """Under bf16 autocast with an fp32 weight the matmuls run in bf16 (as F.linear's would), the loss is fp32 and
    each gradient comes back in its input's dtype."""
    seen = []
    rows = lce._cross_entropy_rows
    monkeypatch.setattr(lce, "_cross_entropy_rows", lambda logits, *a, **k: seen.append(logits.dtype)
                        or rows(logits, *a, **k))
    hidden, weight, labels, tw = make_inputs(FEW, 128, 6400, hidden_dtype, seed=10, weighted=True,
                                             weight_dtype=torch.float32)
    for fn_name, kw in (("linear_cross_entropy", {"token_weights": tw}), ("linear_logprobs", {})):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = getattr(lce, fn_name)(hidden, weight, labels, **kw)
            gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
        assert out.dtype == torch.float32 and gh.dtype == hidden_dtype and gw.dtype == torch.float32
        hidden32 = hidden.detach().float().requires_grad_()
        rout = getattr(reference, fn_name)(hidden32, weight, labels, **kw)
        rgh, rgw = torch.autograd.grad(rout.sum(), (hidden32, weight))
        assert_close(out, rout, TOL[torch.bfloat16], f"{fn_name} autocast output")
        assert_close(gh, rgh, TOL[torch.bfloat16], f"{fn_name} autocast grad hidden")
        assert_close(gw, rgw, TOL[torch.bfloat16], f"{fn_name} autocast grad weight")
    assert seen and set(seen) == {torch.bfloat16}


def test_bad_inputs_are_clear_errors():
    hidden, weight, labels, _ = make_inputs(8, 16, 50, torch.float32, seed=0)
    if not ON_GPU:  # on CUDA it is a device-side assertion, which would end the process's CUDA context
        with pytest.raises(ValueError, match=r"linear_cross_entropy.py: labels must be in \[0, 50\)"):
            lce.linear_cross_entropy(hidden, weight, torch.full_like(labels, 50))
    with pytest.raises(ValueError, match="hidden is torch.bfloat16 but weight is torch.float32"):
        lce.linear_logprobs(hidden.bfloat16(), weight, labels)
    with pytest.raises(ValueError, match=r"hidden must be \(N, H\) and weight \(V, H\)"):
        lce.linear_cross_entropy(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        lce.linear_cross_entropy(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="token_weights must have shape"):
        lce.linear_cross_entropy(hidden, weight, labels, token_weights=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="reduction must be"):
        lce.linear_cross_entropy(hidden, weight, labels, reduction="avg")


def tiny_model_pair():
    """The same tiny dense model (vocab 1000, tied lm_head / embedding) on the torch ops and on the torch ops with
    only linear_cross_entropy / linear_logprobs taken from the Triton kernel file."""
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=1000, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = MiniMindForCausalLM(cfg).to(DEVICE)
    fused = MiniMindForCausalLM(cfg).to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    ops = SimpleNamespace(**{**vars(get_backend("torch")), "name": "torch+triton-lce",
                             "linear_cross_entropy": lce.linear_cross_entropy, "linear_logprobs": lce.linear_logprobs})
    for m in fused.modules():
        if hasattr(m, "ops"):
            m.ops = ops
    return ref, fused


def test_model_loss_and_tied_gradient():
    ref, fused = tiny_model_pair()
    ids = torch.randint(0, 1000, (2, 24), device=DEVICE)
    labels = ids.clone()
    labels[0, :10] = -100
    weights = torch.ones(2, 24, device=DEVICE)
    weights[1, 5:9] = 10.0
    outs = [m(ids, labels=labels, loss_weights=weights) for m in (ref, fused)]
    assert outs[1].logits is None
    assert_close(outs[1].loss, outs[0].loss, TOL[torch.float32], "model loss")
    for out in outs:
        out.loss.backward()
    assert fused.lm_head.weight is fused.model.embed_tokens.weight  # tied: one gradient, both uses summed
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, 1e-4, f"grad {name}")  # fp32 through the whole model: 1e-4 (issue 3)


def test_model_token_logprobs():
    ref, fused = tiny_model_pair()
    ids = torch.randint(0, 1000, (3, 16), device=DEVICE)
    labels = ids.clone()
    labels[1, 8:] = -100
    lps = [m.token_logprobs(ids, labels)[0] for m in (ref, fused)]
    assert_close(lps[1], lps[0], TOL[torch.float32], "token logprobs")
    g = torch.randn(lps[0].shape, device=DEVICE)
    for lp in lps:
        lp.backward(g)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, 1e-4, f"logprob grad {name}")
