"""Shared test setup. On a machine without CUDA, Triton kernels run under the interpreter, which must be switched
on before anything imports triton."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
