import os

import pytest
import torch

import kernels
from kernels import backend
from minimind import MiniMindConfig, MiniMindForCausalLM


def test_torch_backend_has_every_op():
    ops = kernels.get_backend("torch")
    for op in kernels.OPS:
        assert callable(getattr(ops, op))
    assert "torch" in kernels.available_backends()


def test_triton_backend_takes_every_op_from_its_kernel_file():
    """A kernel file that fails to import becomes an op that raises NotImplementedError when called (the backend's
    rule for an op it lacks); here every triton op must be the kernel file's own function, so that shows as a
    failure, not as a skipped stage test."""
    pytest.importorskip("triton")
    if backend.triton_unavailable_reason():
        pytest.skip(backend.triton_unavailable_reason())
    ops = kernels.get_backend("triton")
    for op, spec in backend.TRITON_OPS.items():
        module, name = spec.split(":")
        fn = getattr(ops, op)
        assert (fn.__module__, fn.__name__) == (module, name), f"triton {op}: {spec} did not load"


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"unknown kernels backend 'cuda'.*available here: \['torch'"):
        kernels.get_backend("cuda")
    with pytest.raises(ValueError, match="unknown kernels backend"):
        MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4), kernels="x")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs triton compiled")
    monkeypatch.setattr(backend, "_cache", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.get_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.get_backend("triton").name == "triton"


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False), ("3.10.1", "2.4.0", False)])
def test_triton_interpreter_before_3_7_with_numpy_2_4_is_refused(monkeypatch, triton_version, numpy_version,
                                                                   refused):
    """triton < 3.7's interpreter calls int() on 1-element arrays, which numpy 2.4 refuses: the triton backend says
    so and what to install, instead of an InterpreterError in the first backward."""
    import numpy
    import triton
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs triton compiled")
    monkeypatch.setattr(backend, "_cache", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    if refused:
        with pytest.raises(RuntimeError, match=r"triton 3\.6\.0's interpreter fails under numpy 2\.4\.6.*'numpy<2\.4'"):
            kernels.get_backend("triton")
    else:
        assert kernels.get_backend("triton").name == "triton"


def test_liger_unavailable_is_a_clear_error(monkeypatch):
    if backend.liger_unavailable_reason() is None:
        pytest.skip("liger is available here")
    with pytest.raises(RuntimeError, match="kernels='liger' is unavailable"):
        kernels.get_backend("liger")


def test_missing_op_raises_not_implemented_naming_it():
    fail = backend._missing("triton", "moe_experts", "not written yet")
    with pytest.raises(NotImplementedError, match="'moe_experts'"):
        fail()


def test_flash_attention_falls_back_with_a_notice():
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    if torch.cuda.is_available() and os.environ.get("HAS_FLASH"):
        pytest.skip("flash-attn present")
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        MiniMindForCausalLM(cfg, attn="flash")
