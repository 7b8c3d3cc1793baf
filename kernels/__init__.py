"""Hot ops of a MiniMind model, each in a pure-PyTorch reference and in hand-written Triton kernels."""
from kernels.backend import OPS, available_backends, get_backend

__all__ = ["OPS", "available_backends", "get_backend"]
