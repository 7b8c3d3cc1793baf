"""The kernel backend switch: one name chooses the implementation of every hot op.

    ops = get_backend("torch" | "triton" | "liger")
    ops.rms_norm(x, w, eps); ops.add_rms_norm(x, r, w, eps); ops.rope(q, k, cos, sin, offset)
    ops.qk_norm_rope(q, k, q_weight, k_weight, cos, sin, offset, eps)          (minimind-3's q/k norm, then RoPE)
    ops.swiglu(g, u); ops.linear_cross_entropy(h, W, labels, ...); ops.linear_logprobs(h, W, labels)
    ops.moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down)

`torch` is kernels/reference.py. `triton` takes each op from its kernel file; `liger` from liger-kernel where it
has the op. An op a backend does not have raises NotImplementedError naming it: nothing is silently replaced.
"""
import importlib
import os
import re
from types import SimpleNamespace

OPS = ("rms_norm", "add_rms_norm", "rope", "qk_norm_rope", "swiglu", "linear_cross_entropy", "linear_logprobs",
       "moe_experts")

# op -> "module:function" of the triton backend; each kernel file exports its op.
TRITON_OPS = {
    "rms_norm": "kernels.rms_norm:rms_norm",
    "add_rms_norm": "kernels.rms_norm:add_rms_norm",
    "rope": "kernels.rope:rope",
    "qk_norm_rope": "kernels.qk_norm_rope:qk_norm_rope",
    "swiglu": "kernels.swiglu:swiglu",
    "linear_cross_entropy": "kernels.linear_cross_entropy:linear_cross_entropy",
    "linear_logprobs": "kernels.linear_cross_entropy:linear_logprobs",
    "moe_experts": "kernels.moe:moe_experts",
}

_cache = {}


def _missing(backend, op, why):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"the {backend!r} backend has no {op!r} op ({why}); use kernels='torch' for it")
    fail.__name__ = op
    return fail


def _load(spec, backend, op):
    module, fn = spec.split(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ModuleNotFoundError, AttributeError) as e:
        return _missing(backend, op, f"{spec} is not available: {e}")


def _release(version):
    """(major, minor) of a version string: "3.6.0" -> (3, 6)."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def triton_unavailable_reason():
    """None when Triton kernels can run here, else a sentence saying why not."""
    try:
        import triton
    except ImportError:
        return "triton is not installed (pip install triton; Linux only)"
    import torch
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("no CUDA GPU here: on a CPU, Triton kernels run only under the interpreter; "
                "set TRITON_INTERPRET=1 before the first `import triton`")
    import numpy
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        # before 3.7 the interpreter takes a loop bound such as a program id with int() of a 1-element array
        return (f"triton {triton.__version__}'s interpreter fails under numpy {numpy.__version__} (it calls int() "
                "on 1-element arrays, an error since numpy 2.4): pip install 'numpy<2.4', or triton 3.7 or newer")
    return None


def liger_unavailable_reason():
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install -e '.[liger]')"
    import torch
    if not torch.cuda.is_available():
        return "liger-kernel needs a CUDA GPU"
    return None


def available_backends():
    """Names that get_backend accepts on this machine."""
    names = ["torch"]
    if triton_unavailable_reason() is None:
        names.append("triton")
    if liger_unavailable_reason() is None:
        names.append("liger")
    return names


def get_backend(name="torch"):
    """The ops namespace for backend `name`; a clear error if it cannot run here."""
    if name in _cache:
        return _cache[name]
    if name == "torch":
        from kernels import reference
        ops = {op: getattr(reference, op) for op in OPS}
    elif name == "triton":
        why = triton_unavailable_reason()
        if why:
            raise RuntimeError(f"kernels='triton' is unavailable: {why}. Available here: {available_backends()}")
        ops = {op: _load(spec, "triton", op) for op, spec in TRITON_OPS.items()}
    elif name == "liger":
        why = liger_unavailable_reason()
        if why:
            raise RuntimeError(f"kernels='liger' is unavailable: {why}. Available here: {available_backends()}")
        from kernels import liger_ops
        ops = {op: getattr(liger_ops, op, None) or _missing("liger", op, "liger-kernel has no such op")
               for op in OPS}
    else:
        raise ValueError(f"unknown kernels backend {name!r}; choose one of ('torch', 'triton', 'liger'); "
                         f"available here: {available_backends()}")
    _cache[name] = SimpleNamespace(name=name, **ops)
    return _cache[name]
