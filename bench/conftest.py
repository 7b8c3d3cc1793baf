"""The benchmarks as pytest-benchmark tests (pytest-benchmark is in the dev extras):

    python -m pytest bench/ --benchmark-only --benchmark-json=benchmarks.json

bench/test_gpu_benchmarks.py (kernels and training steps, timed with CUDA synchronisation) skips without CUDA;
bench/test_cpu_benchmarks.py (tokenisation, token-cache build, loaders, the modelled step's count) runs anywhere.
`python -m pytest -q -n 2 tests` (the test suite) does not collect them. Each benchmark's extra_info carries its
rates (MB/s, tokens/s, launches): pytest-benchmark's own statistics are seconds per round.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the modelled step builds the triton backend (nothing runs)


def pytest_collection_modifyitems(config, items):
    if not config.pluginmanager.hasplugin("benchmark"):
        skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
        for item in items:
            item.add_marker(skip)
