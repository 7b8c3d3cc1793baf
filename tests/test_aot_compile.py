"""Every registered Triton kernel, in every configuration its wrapper picks at MiniMind2 and minimind-3 shapes, compiles for real
GPUs (sm_80, sm_86, sm_90) with triton.compile, no GPU needed. conftest.py turns the interpreter on, under which
@triton.jit functions cannot be compiled, so the compiler runs in a subprocess without TRITON_INTERPRET, with an
empty Triton cache so that nothing passes from a cached binary."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_compiles_for_sm80_sm86_sm90(tmp_path):
    """One shard of the cases per CPU core, in parallel processes; every shard must compile everything it has."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default; set so it does not warn
    n = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-m", "kernels.aot", "--check", "--cc", "80", "86", "90",
                               "--shard", f"{k}/{n}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(n)]
    for k, proc in enumerate(procs):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"AOT compilation failed (shard {k}/{n}):\n{out[-6000:]}\n{err[-6000:]}"
        assert " 0 failed" in out, out


def test_registry_covers_every_kernel_file_and_uses_the_wrappers_configs():
    """Each kernel file in the registry yields cases for all three of its MiniMind2 configurations, named by them."""
    from kernels import aot, qk_norm_rope, rms_norm, rope, swiglu
    names = [c.name for c in aot.cases(["rms_norm", "rope", "qk_norm_rope", "swiglu"])]
    for H in aot.HIDDEN:
        block, _ = rms_norm.rms_norm_config(H, 2)
        assert f"rms_norm_fwd[BLOCK={block},bf16/fp32,residual fp32]" in names
        assert f"rms_norm_bwd[BLOCK={block},bf16/fp32,dh]" in names
        assert f"rms_norm_bwd[BLOCK={block},fp32/fp32,dh,dx bf16,dr fp32]" in names  # autocast: fp32 stream
    for n_q, n_kv, D in aot.HEADS:
        bq, bkv, bh, _ = rope.rope_config(n_q, n_kv, D)
        assert f"rope_bwd[BLOCK_HQ={bq},BLOCK_HKV={bkv},BLOCK_HALF={bh},bf16]" in names
    assert (8, 4, 96) in aot.HEADS  # minimind-3's heads
    for n_q, n_kv, D in aot.HEADS:
        bq, bkv, bh, _, _ = qk_norm_rope.qk_norm_rope_config(n_q, n_kv, D)
        for kernel in ("fwd", "bwd"):
            assert f"qk_norm_rope_{kernel}[BLOCK_HQ={bq},BLOCK_HKV={bkv},BLOCK_HALF={bh},half={D // 2},bf16/fp32]" in names
    block, _ = swiglu.SWIGLU_CONFIG
    assert f"swiglu_bwd[BLOCK={block},bf16]" in names
