"""Shared by the stage tests: a small copy of the bundled demo data and the flags of a tiny model."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_SIZES = {"pretrain": 400, "sft": 160, "dpo": 80, "reason": 120}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """{"pretrain", "sft", "dpo", "reason", "eval"} -> path of a small demo data set (one per xdist worker)."""
    from minimind.demo import write_demo_data
    return write_demo_data(tmp_path_factory.mktemp("demo_data"), sizes=SMALL_SIZES)


def tiny_flags(out_dir, data_path, *, steps=4, batch_size=4, seq=64, kernels="torch", extra=(), preset=None):
    """argv for a hidden-64, 2-layer model trained `steps` optimizer steps in fp32 on the CPU. preset minimind3 or
    minimind3-moe: that structure (q/k norm, 8 q / 4 kv heads, top-1 MoE without shared expert) with heads of 24,
    which is not hidden / heads."""
    heads = (["--preset", preset, "--head_dim", "24"] if preset else
             ["--num_attention_heads", "4", "--num_key_value_heads", "2"])
    return ["--data_path", str(data_path), "--out_dir", str(out_dir), "--hidden_size", "64",
            "--num_hidden_layers", "2", *heads,
            "--max_seq_len", str(seq), "--batch_size", str(batch_size), "--accumulation_steps", "1",
            "--max_steps", str(steps), "--log_interval", "1", "--save_interval", "1000", "--dtype", "fp32",
            "--device", "cpu", "--kernels", kernels, "--learning_rate", "3e-3", "--warmup_iters", "0",
            *map(str, extra)]


def run_module(args, timeout=300, env=None):
    """Run `python -m ...` (or torchrun) in a subprocess from the repository root, one thread per process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread while the test runs: with pytest-xdist (or other work) on a 2-core machine, two
    spinning PyTorch workers per process make every step 10-25x slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
