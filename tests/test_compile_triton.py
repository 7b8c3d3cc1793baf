"""`--compile --kernels triton`: torch.compile takes every decoder block and every triton op whole, with the Triton
kernels inside the graph, and a batch dimension that varies stays symbolic instead of breaking the trace.

No GPU is needed: tests/triton_dynamo_trace.py runs Dynamo and AOT autograd's partition on CPU tensors (stopping
before any kernel runs), in a subprocess because conftest.py has turned the interpreter on. What it catches is what
fails first on a GPU: a graph break in a kernel wrapper (a branch on a tensor's value, a host sync), or a launch
option computed from the token count (symbolic under dynamic shapes; Triton needs a number). On a CUDA machine a
second test also runs the compiled blocks and compares them with eager."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kernels per forward graph: 2 add_rms_norm (or rms_norm + add_rms_norm), rope (minimind-3: qk_norm_rope), and the
# MLP's swiglu; the MoE MLP has the shared expert's swiglu (minimind-3: none) and the experts' gate_up,
# rows_to_slots and combine
BLOCK_FORWARD_KERNELS = {"dense": 4, "moe": 7, "minimind3": 4, "minimind3-moe": 6}
BLOCK_BACKWARD_KERNELS = {"dense": 4, "moe": 10, "minimind3": 4, "minimind3-moe": 9}  # + experts' weight gradients
OP_FORWARD_KERNELS = {"rms_norm": 1, "swiglu": 1, "rope": 1, "qk_norm_rope": 1, "linear_cross_entropy": 1,
                      "linear_logprobs": 1, "moe_experts": 3}
# the mean linear cross-entropy computes both gradients in its forward (its backward only scales them); the MoE's
# backward is gate_up's, rows_to_slots', the combine's and the 3 weight gradients'
OP_BACKWARD_KERNELS = {"rms_norm": 1, "swiglu": 1, "rope": 1, "qk_norm_rope": 1, "linear_cross_entropy": 0,
                       "linear_logprobs": 1, "moe_experts": 6}


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default; set so it does not warn
    proc = subprocess.run([sys.executable, "-m", "tests.triton_dynamo_trace"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    cases = {}
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue  # anything a library printed
        case = json.loads(line)
        cases[case.pop("case")] = case
    assert cases, f"the trace script printed nothing:\n{proc.stderr[-6000:]}"
    errors = {name: c["error"] + "\n" + c["traceback"] for name, c in cases.items() if "error" in c}
    assert not errors and proc.returncode == 0, "\n\n".join(f"{k}: {v}" for k, v in errors.items())
    return cases


def _asserts(case, role):
    return [g["asserts"] for g in case["graphs"] if g["role"] == role]


def _kernels(case, role):
    """Triton kernels in each of the case's graphs of that role (forward, backward, inference)."""
    return [g.get("triton_kernel_wrapper_functional", 0) for g in case["graphs"] if g["role"] == role]


def test_every_block_traces_whole_with_its_kernels_and_a_symbolic_batch(traced):
    blocks = {name: c for name, c in traced.items() if name.startswith("block[")}
    # MiniMind2 dense / MoE x first layer / later layer x training / no grad; minimind-3's later layers
    assert len(blocks) == 12
    for name, case in blocks.items():
        kind = name.removeprefix("block[").split(",")[0]
        role = "forward" if "train" in name else "inference"
        # the first shape, then the second with a symbolic size, which the third and fourth reuse (no recompile)
        assert _kernels(case, role) == [BLOCK_FORWARD_KERNELS[kind]] * 2 and case["dynamic"], (name, case)
        if kind.endswith("moe"):  # the expert-id check stays in the graph as a device assert
            assert all(_asserts(case, role)), (name, case)
        if role == "forward":  # the backward of each shape, as Dynamo traced it and as AOT autograd partitioned it
            assert case["dynamo_backward_kernels"] == [BLOCK_BACKWARD_KERNELS[kind]] * 2, (name, case)
            assert BLOCK_BACKWARD_KERNELS[kind] in _kernels(case, "backward"), (name, case)


def test_every_triton_op_traces_whole(traced):
    # the elementwise ops and the MoE take a new token count symbolically (2 graphs for 4 counts); the linear
    # cross-entropy's Python loop over token chunks specialises it (a graph per count: it runs outside the
    # compiled blocks)
    for op, n in OP_FORWARD_KERNELS.items():
        graphs = 4 if op.startswith("linear_") else 2
        assert _kernels(traced[op], "forward") == [n] * graphs, (op, traced[op])
        assert traced[op]["dynamo_backward_kernels"] == [OP_BACKWARD_KERNELS[op]] * graphs, (op, traced[op])
        assert traced[op]["dynamic"] == (graphs == 2), (op, traced[op])
    for op in ("linear_cross_entropy", "linear_logprobs", "moe_experts"):  # label / expert-id range checks
        assert all(_asserts(traced[op], "forward")), (op, traced[op])


@pytest.mark.skipif(DEVICE != "cuda", reason="runs the compiled kernels: needs a CUDA GPU")
@pytest.mark.parametrize("preset", [None, "moe", "minimind3", "minimind3-moe"])
def test_compiled_triton_blocks_match_eager_on_cuda(preset):
    """Inductor compiles the blocks around the Triton kernels; two batch shapes, forward and backward, against the
    same model run eagerly (fp32: the compiled graph reorders only elementwise float math)."""
    from minimind import MiniMindConfig, MiniMindForCausalLM
    from train.engine import compile_blocks
    torch._dynamo.reset()
    shape = dict(hidden_size=128, num_hidden_layers=2, vocab_size=257)
    if preset and preset.startswith("minimind3"):  # q/k norm fused into RoPE; 8 q / 4 kv heads of 32
        cfg = MiniMindConfig.from_preset(preset, head_dim=32, **shape)
    else:
        cfg = MiniMindConfig(num_attention_heads=4, num_key_value_heads=2, use_moe=preset == "moe", **shape)
    torch.manual_seed(0)
    eager = MiniMindForCausalLM(cfg, kernels="triton").cuda()
    compiled = MiniMindForCausalLM(cfg, kernels="triton").cuda()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    for B, T in ((2, 32), (3, 48), (2, 40)):
        ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    torch._dynamo.reset()
