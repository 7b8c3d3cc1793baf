"""kernels/moe.py (the triton `moe_experts` op) against kernels/reference.py: forward output and the gradients of x,
topk_weight and every expert weight, on fresh random inputs, compared with the reference evaluated in float64 on the
same (already rounded) inputs. Every float buffer the kernels fill starts as NaN, so an unwritten element fails.
On CUDA the shapes are MiniMind2-MoE's (hidden 640, intermediate 1728); under the interpreter they are small."""
import types

import pytest
import torch

pytest.importorskip("triton")
from kernels import get_backend, moe, reference  # noqa: E402
from minimind.config import MiniMindConfig  # noqa: E402
from minimind.model import MiniMindForCausalLM, MoEFeedForward  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# fp32: IEEE products summed in another order than torch's, over at most a few thousand terms.
# bf16: the kernel rounds h = silu(g)*u and each expert's output to bf16 (as the reference does), 2^-8 relative each;
# the interpreter truncates fp32 -> bf16 casts instead of rounding to nearest, which doubles that.
# fp16: the same two roundings at 2^-11.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if CUDA else 3e-2, torch.float16: 5e-3}
# (N tokens, H hidden, I expert width, E experts, K experts per token)
SHAPES = ([(4096, 640, 1728, 4, 2), (3001, 640, 1728, 8, 2), (1000, 637, 1728, 8, 1)] if CUDA else
          [(37, 40, 48, 4, 2), (21, 640, 48, 4, 2), (45, 37, 96, 8, 1), (70, 37, 48, 8, 2)])


@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN."""
    def empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(moe, "_empty", empty)


def rel(actual, expected):
    """max |actual - expected| / max |expected|."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def make_inputs(N, H, I, E, K, dtype, seed, topk_idx=None):
    """x (N, H), topk_idx (N, K) distinct experts per token, topk_weight (N, K) float32 summing to 1, weights."""
    g = torch.Generator().manual_seed(seed)
    if topk_idx is None:
        topk_idx = torch.rand(N, E, generator=g).argsort(dim=1)[:, :K]
    w = torch.rand(N, K, generator=g) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    x = torch.randn(N, H, generator=g)
    w_gate = torch.randn(E, I, H, generator=g) * H ** -0.5
    w_up = torch.randn(E, I, H, generator=g) * H ** -0.5
    w_down = torch.randn(E, H, I, generator=g) * I ** -0.5
    dout = torch.randn(N, H, generator=g)
    cast = [t.to(DEVICE, dtype) for t in (x, w_gate, w_up, w_down, dout)]
    return cast[0], topk_idx.to(DEVICE), w.to(DEVICE), cast[1], cast[2], cast[3], cast[4]


def run(fn, x, topk_idx, topk_weight, w_gate, w_up, w_down, dout, dtype):
    """fn's output and the gradients (x, topk_weight, w_gate, w_up, w_down), with inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w_gate, w_up, w_down)]
    tw = topk_weight.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    y = fn(leaves[0], topk_idx, tw, *leaves[1:])
    y.backward(dout.to(y.dtype))
    return [y, leaves[0].grad, tw.grad] + [t.grad for t in leaves[1:]]


def check_against_reference(inputs, dtype):
    ours = run(moe.moe_experts, *inputs, dtype)
    exact = run(reference.moe_experts, *inputs, torch.float64)
    assert ours[0].dtype == dtype
    for name, a, b in zip(("out", "dx", "d_topk_weight", "d_w_gate", "d_w_up", "d_w_down"), ours, exact):
        assert not torch.isnan(a).any(), f"{name}: NaN (an element was never written)"
        assert rel(a, b) < TOL[dtype], f"{name}: relative error {rel(a, b):.3g} >= {TOL[dtype]} ({dtype})"
    return ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-I{}-E{}-K{}".format(*s))
def test_matches_reference(shape, dtype):
    check_against_reference(make_inputs(*shape, dtype, seed=sum(shape)), dtype)


# minimind-3's MoE: 4 experts of width 2432, top-1 (no shared expert: that is the layer's, tested below). On CUDA
# at hidden 768 and 4096 tokens; under the interpreter the width alone (hidden 96, 6 tokens, bf16: ~40 s).
MINIMIND3_SHAPES = ([((4096, 768, 2432, 4, 1), dtype) for dtype in (torch.float32, torch.bfloat16)] if CUDA else
                    [((6, 96, 2432, 4, 1), torch.bfloat16)])


@pytest.mark.parametrize("shape,dtype", MINIMIND3_SHAPES, ids=str)
def test_matches_reference_at_minimind3_width(shape, dtype):
    check_against_reference(make_inputs(*shape, dtype, seed=19), dtype)


def test_matches_reference_in_fp16():
    check_against_reference(make_inputs(*SHAPES[0], torch.float16, seed=5), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_without_tokens_gets_exact_zero_gradient(dtype):
    N, H, I, E, K = (2000, 640, 1728, 8, 2) if CUDA else (40, 40, 48, 8, 2)
    g = torch.Generator().manual_seed(7)
    idx = torch.rand(N, E - 2, generator=g).argsort(dim=1)[:, :K]
    idx = torch.tensor([0, 1, 2, 4, 6, 7])[idx]  # experts 3 and 5 get no token
    ours = check_against_reference(make_inputs(N, H, I, E, K, dtype, seed=8, topk_idx=idx), dtype)
    for name, grad in zip(("d_w_gate", "d_w_up", "d_w_down"), ours[3:]):
        assert (grad[[3, 5]] == 0).all(), f"{name}: experts without tokens must get exactly zero"
        assert (grad[[0, 1, 2, 4, 6, 7]].abs().amax(dim=(1, 2)) > 0).all(), f"{name}: a used expert got zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_tokens_to_one_expert_spans_several_row_tiles(dtype):
    """300 rows on expert 2 cover several BLOCK_M tiles of every config (the last one ragged); the rest get none."""
    N, H, I, E, K = (3000, 640, 1728, 4, 1) if CUDA else (300, 37, 48, 4, 1)
    idx = torch.full((N, K), 2)
    ours = check_against_reference(make_inputs(N, H, I, E, K, dtype, seed=9, topk_idx=idx), dtype)
    assert (ours[3][[0, 1, 3]] == 0).all() and (ours[5][[0, 1, 3]] == 0).all()


def test_single_token_and_no_tokens():
    H, I, E, K = (640, 1728, 4, 2) if CUDA else (37, 48, 4, 2)
    check_against_reference(make_inputs(1, H, I, E, K, torch.float32, seed=10), torch.float32)
    out, dx, dw, *d_weights = run(moe.moe_experts, *make_inputs(0, H, I, E, K, torch.float32, seed=10), torch.float32)
    assert out.shape == dx.shape == (0, H) and dw.shape == (0, K)
    assert all((d == 0).all() for d in d_weights)


def test_deterministic_and_k_slots_may_share_an_expert():
    """Two runs agree bit for bit (no atomics); a token may list the same expert twice (the op allows it)."""
    N, H, I, E, K = (512, 640, 1728, 4, 2) if CUDA else (19, 40, 48, 4, 2)
    idx = torch.randint(0, E, (N, K), generator=torch.Generator().manual_seed(11))
    idx[:, 1] = idx[:, 0]
    inputs = make_inputs(N, H, I, E, K, torch.bfloat16, seed=12, topk_idx=idx)
    first = check_against_reference(inputs, torch.bfloat16)
    second = run(moe.moe_experts, *inputs, torch.bfloat16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autocast_runs_in_the_autocast_dtype():
    """fp32 x and weights under bf16 autocast: computed in bf16 like F.linear under autocast, returned as fp32."""
    N, H, I, E, K = 23, 40, 48, 4, 2
    x, idx, tw, wg, wu, wd, dout = make_inputs(N, H, I, E, K, torch.float32, seed=13)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = run(moe.moe_experts, x, idx, tw, wg, wu, wd, dout, torch.float32)
    bf16 = [t.to(torch.bfloat16) for t in (x, wg, wu, wd)]
    exact = run(reference.moe_experts, bf16[0], idx, tw, *bf16[1:], dout, torch.float64)
    assert ours[0].dtype == torch.float32 and ours[3].dtype == torch.float32
    for a, b in zip(ours, exact):
        assert rel(a, b) < TOL[torch.bfloat16]


def test_bad_arguments_are_clear_errors():
    x, idx, tw, wg, wu, wd, _ = make_inputs(5, 40, 48, 4, 2, torch.float32, seed=14)
    with pytest.raises(ValueError, match=r"kernels/moe.py moe_experts: want topk_idx \(N=5"):
        moe.moe_experts(x, idx, tw, wg, wu, wd[:, :, :32])
    with pytest.raises(ValueError, match="w_up is torch.bfloat16 but x is torch.float32"):
        moe.moe_experts(x, idx, tw, wg, wu.bfloat16(), wd)
    with pytest.raises(ValueError, match="topk_idx must be int32 or int64"):
        moe.moe_experts(x, idx.float(), tw, wg, wu, wd)
    if not CUDA:  # on CUDA the id check is asynchronous (no host sync) and would poison the context
        with pytest.raises(ValueError, match=r"expert ids outside \[0, 4\)"):
            moe.moe_experts(x, idx + 3, tw, wg, wu, wd)
        negative = idx.clone()
        negative[2, 1] = -1
        with pytest.raises(ValueError, match=r"expert ids outside \[0, 4\)"):
            moe.moe_experts(x, negative, tw, wg, wu, wd)


@pytest.mark.skipif(not CUDA, reason="host synchronisation exists only on CUDA")
def test_no_host_sync_on_cuda():
    inputs = make_inputs(4096, 640, 1728, 4, 2, torch.bfloat16, seed=15)
    run(moe.moe_experts, *inputs, torch.bfloat16)  # compile first
    leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[3], inputs[4], inputs[5])]
    tw = inputs[2].clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = moe.moe_experts(leaves[0], inputs[1], tw, *leaves[1:])
        y.backward(inputs[6])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_aot_registry_has_every_tile_config_the_wrapper_uses():
    """kernels/aot.py registers the moe kernels with the wrapper's own TILES (test_aot_compile.py compiles them)."""
    from kernels import aot
    names = {c.name for c in aot.cases(["moe"])}
    for kernel, key in (("gate_up_fwd", "gate_up"), ("gate_up_bwd", "gate_up_backward"),
                        ("rows_to_slots", "rows_to_slots")):
        for size, dtype in ((2, "bf16"), (2, "fp16"), (4, "fp32")):
            t = moe.TILES[key][size]
            assert f"moe_{kernel}[{t.block_m}x{t.block_n}x{t.block_k},w{t.num_warps},s{t.num_stages},{dtype}]" in names
    t = moe.TILES["weight_grad"][2]
    assert f"moe_weight_grad[{t.block_m}x{t.block_n}x{t.block_k},w{t.num_warps},s{t.num_stages},gather_a,bf16]" in names
    for H in aot.HIDDEN:
        assert f"moe_combine[BLOCK={moe.combine_block(H)},weighted,bf16]" in names


def ops_with_triton_moe():
    """The torch backend with only moe_experts from kernels/moe.py (the other triton ops are tested elsewhere)."""
    return types.SimpleNamespace(**{**vars(get_backend("torch")), "name": "torch+moe", "moe_experts": moe.moe_experts})


def use_ops(model, ops):
    for m in model.modules():
        if hasattr(m, "ops"):
            m.ops = ops


def tiny_moe_config(generation="minimind2"):
    """MiniMind2's MoE (top-2, a shared expert, sequence-level aux loss) or minimind-3's (top-1, no shared expert,
    batch-level aux loss; q/k norm, 8 q / 4 kv heads of 8), at toy size."""
    shape = dict(hidden_size=32, num_hidden_layers=2, vocab_size=97, max_position_embeddings=32, use_moe=True,
                 intermediate_size=48)
    if generation == "minimind3":
        return MiniMindConfig.from_preset("minimind3-moe", head_dim=8, **shape)
    return MiniMindConfig(num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                          **shape)


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_moe_layer_gate_weight_gets_the_reference_gradient(generation):
    """Through MoEFeedForward (softmax gate, top-k, renormalised weights, MiniMind2's shared expert, the aux loss):
    output and every parameter gradient, including the router's gate weight, match the torch reference in
    float32."""
    torch.manual_seed(16)
    ref = MoEFeedForward(tiny_moe_config(generation), get_backend("torch")).to(DEVICE).train()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoEFeedForward(tiny_moe_config(generation), ops_with_triton_moe()).to(DEVICE).train()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32, device=DEVICE)
    dy = torch.randn(2, 9, 32, device=DEVICE)
    for m in (ref, ours):
        y, aux = m(x)
        ((y * dy).sum() + aux).backward()
    y_ref, _ = ref(x)
    assert rel(ours(x)[0], y_ref) < 1e-5
    grads = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert rel(grads[name].grad, p.grad) < 1e-5, f"{name}: relative error {rel(grads[name].grad, p.grad):.3g}"
    assert ours.gate.weight.grad.abs().max() > 0


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_tiny_moe_model_trains_like_the_torch_backend(generation):
    """Three SGD steps of a 2-layer MoE MiniMind: the loss (with the aux loss) and every parameter gradient at every
    step agree with kernels="torch" to 1e-4 relative (float32; summation order compounded over two layers)."""
    torch.manual_seed(17)
    ref = MiniMindForCausalLM(tiny_moe_config(generation), kernels="torch").to(DEVICE)
    ours = MiniMindForCausalLM(tiny_moe_config(generation), kernels="torch").to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    use_ops(ours, ops_with_triton_moe())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ref, ours)]
    g = torch.Generator().manual_seed(18)
    for step in range(3):
        ids = torch.randint(0, 97, (2, 16), generator=g).to(DEVICE)
        losses = []
        for model, opt in zip((ref, ours), opts):
            opt.zero_grad()
            out = model(ids, labels=ids)
            out.loss.backward()
            losses.append(out.loss)
            opt.step()
        assert abs(losses[1].item() - losses[0].item()) < 1e-4 * abs(losses[0].item()), f"step {step}: loss"
        named = dict(ours.named_parameters())
        for name, p in ref.named_parameters():
            assert rel(named[name].grad, p.grad) < 1e-4, f"step {step}: {name}: {rel(named[name].grad, p.grad):.3g}"
