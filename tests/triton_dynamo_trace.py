"""Trace the triton backend through torch.compile's front end (Dynamo, then AOT autograd's forward/backward
partition) on a machine without a GPU, running no kernel. Run by tests/test_compile_triton.py in a subprocess:

    python -m tests.triton_dynamo_trace      (prints one JSON line per case)

Dynamo traces a user Triton kernel into the graph only when it believes Triton can run here (a GPU), and works out
which arguments a kernel writes from the kernel's TTIR, built for the active Triton driver's target. On a CPU
neither holds, so this script patches torch's `has_triton` to True and makes a stand-in driver that reports sm_90
the active one. The kernels must be imported without TRITON_INTERPRET (the interpreter's functions are not
Triton kernels to Dynamo); the variable is set only afterwards, so get_backend("triton") accepts the CPU.

The compiler backend records the graphs AOT autograd hands it and stops the call with `Traced` instead of running
them. With fullgraph=True, any graph break or tracing error is an exception: the case reports it.
"""
import collections
import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import kernels.linear_cross_entropy  # noqa: E402,F401  (compiled-mode kernels: imported before the env is set)
import kernels.moe  # noqa: E402,F401
import kernels.qk_norm_rope  # noqa: E402,F401
import kernels.rms_norm  # noqa: E402,F401
import kernels.rope  # noqa: E402,F401
import kernels.swiglu  # noqa: E402,F401

os.environ["TRITON_INTERPRET"] = "1"
import torch.utils._triton  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

from kernels import get_backend  # noqa: E402
from minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402


class Traced(Exception):
    """Raised by the compiled graph instead of running it."""


class StandInDriver:
    """Only what torch's mutation analysis asks of the active driver: the target to build TTIR for."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _call_targets(gm, out):
    for node in gm.graph.nodes:
        if node.op == "call_function":
            out.append(getattr(node.target, "__name__", str(node.target)))
    for child in gm.children():
        if isinstance(child, torch.fx.GraphModule):
            _call_targets(child, out)
    return out


# (batch, length) of the calls: the second makes Dynamo recompile with a symbolic size, as training on batches of
# varying length does; the others, in other power-of-two buckets of B * T, must reuse that graph
LENGTHS = ((2, 16), (3, 24), (2, 40), (5, 72))


def trace(fn, calls):
    """torch.compile(fn, fullgraph=True) with a recording backend; call it on each args tuple of `calls`. Returns
    {"graphs": [{"role": forward | backward | inference, kernel-op name: count, "asserts": n}, ...], "dynamic": bool,
     "dynamo_backward_kernels": [n, ...]} of the graphs AOT autograd produced (dynamic: a graph input has a
    symbolic size; AOT autograd may leave a backward uncompiled until it runs) and, per graph Dynamo traced, the
    kernels in the backward it traced for each autograd.Function (subgraphs bwd_body_*)."""
    graphs, dynamo_backward = [], []

    def recorder(role):
        def record(gm, example_inputs):
            graphs.append((role, gm))

            def run(*args):
                raise Traced
            return run
        return record

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"),
                           inference_compiler=recorder("inference"))

    def dynamo_backend(gm, example_inputs):
        dynamo_backward.append(sum(_call_targets(sub, []).count("triton_kernel_wrapper_mutation")
                                   for name, sub in gm.named_children() if name.startswith("bwd_body")))
        return backend(gm, example_inputs)

    compiled = torch.compile(fn, fullgraph=True, backend=dynamo_backend)
    for grad, args in calls:
        try:
            with torch.set_grad_enabled(grad):
                compiled(*args)
        except Traced:
            pass
    counts = []
    for role, g in graphs:
        targets = _call_targets(g, [])
        counts.append({"role": role, **collections.Counter(t for t in targets if t.startswith("triton_kernel")),
                       "asserts": sum(t.startswith("_assert_async") for t in targets)})
    dynamic = any(isinstance(s, torch.SymInt) for _, g in graphs for n in g.graph.nodes if n.op == "placeholder"
                  for s in getattr(n.meta.get("val"), "shape", ()))
    return {"graphs": counts, "dynamic": dynamic, "dynamo_backward_kernels": dynamo_backward}


def _block_cases():
    """MiniMind2's dense and MoE blocks (first and later layer), and minimind-3's (q/k norm fused into RoPE, 8 q /
    4 kv heads of 24, top-1 MoE without a shared expert; a later layer)."""
    H = 64
    kinds = {"dense": (MiniMindConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97), (0, 1))}
    kinds["moe"] = (MiniMindConfig(**{**kinds["dense"][0].to_dict(), "use_moe": True}), (0, 1))
    for name, moe in (("minimind3", False), ("minimind3-moe", True)):
        kinds[name] = (MiniMindConfig.from_preset("minimind3", hidden_size=H, num_hidden_layers=2, head_dim=24,
                                                  vocab_size=97, use_moe=moe), (1,))
    for kind, (cfg, layers) in kinds.items():
        model = MiniMindForCausalLM(cfg, kernels="triton")
        for layer in layers:
            for grad in (True, False):
                def calls(grad=grad, layer=layer, model=model):
                    out = []
                    for B, T in LENGTHS:
                        h = torch.randn(B, T, H, requires_grad=grad)
                        delta = None if layer == 0 else torch.randn(B, T, H, requires_grad=grad)
                        out.append((grad, (h, delta, model.model.rope_cos[:T], model.model.rope_sin[:T])))
                    return out
                name = f"block[{kind},layer {layer},{'train' if grad else 'no grad'}]"
                yield name, model.model.layers[layer], calls


def _op_cases():
    """Every triton op on its own, as a user compiling more than the blocks would reach it."""
    ops = get_backend("triton")
    H, V, E, I, K = 64, 101, 4, 96, 2

    def rows(*shape, grad=True):
        return torch.randn(*shape, requires_grad=grad)

    def lce(h, w, y):
        return ops.linear_cross_entropy(h, w, y)

    def logprobs(h, w, y):
        return ops.linear_logprobs(h, w, y)

    def moe(x, idx, wt, g, u, d):
        return ops.moe_experts(x, idx, wt, g, u, d)

    def rope(q, k, cos, sin):
        return ops.rope(q, k, cos, sin, 0)

    def qk_norm_rope(q, k, q_weight, k_weight, cos, sin):
        return ops.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, 0, 1e-6)

    cos, sin = (t.float() for t in (torch.randn(128, 16), torch.randn(128, 16)))
    tokens = [B * T for B, T in LENGTHS]
    w, wg, wu, wd = rows(V, H), rows(E, I, H), rows(E, I, H), rows(E, H, I)
    yield "rms_norm", ops.rms_norm, [(True, (rows(n, H), torch.ones(H, requires_grad=True), 1e-5)) for n in tokens]
    yield "swiglu", ops.swiglu, [(True, (rows(n, I), rows(n, I))) for n in tokens]
    yield "rope", rope, [(True, (rows(2, T, 4, 16), rows(2, T, 2, 16), cos[:T], sin[:T])) for _, T in LENGTHS]
    yield "qk_norm_rope", qk_norm_rope, [(True, (rows(2, T, 4, 16), rows(2, T, 2, 16), rows(16), rows(16), cos[:T],
                                                 sin[:T])) for _, T in LENGTHS]
    yield "linear_cross_entropy", lce, [(True, (rows(n, H), w, torch.randint(0, V, (n,)))) for n in tokens]
    yield "linear_logprobs", logprobs, [(True, (rows(n, H), w, torch.randint(0, V, (n,)))) for n in tokens]
    yield "moe_experts", moe, [(True, (rows(n, H), torch.randint(0, E, (n, K)), rows(n, K).softmax(-1), wg, wu, wd))
                               for n in tokens]


def main():
    torch.utils._triton.has_triton = lambda: True
    triton.runtime.driver.set_active(StandInDriver())
    torch.manual_seed(0)
    ok = True
    for name, fn, calls in [*_block_cases(), *_op_cases()]:
        try:
            result = trace(fn, calls() if callable(calls) else calls)
        except Exception as e:  # noqa: BLE001  (reported, and the exit status says so)
            ok = False
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps({"case": name, **result}), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
