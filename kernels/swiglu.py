"""SwiGLU activation in Triton: y = silu(g) * u = g * sigmoid(g) * u, elementwise, forward and backward.

    dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))        du = dy * silu(g)

The backward recomputes sigmoid(g) from the saved g instead of storing it. A 1D grid of large blocks over the
flattened tensors; math in float32, y in gate's dtype, dg and du in the dtypes of gate and up.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


# (BLOCK, num_warps): 4096 elements per program, 16 per thread. Fixed, not sized from the element count, which
# torch.compile makes symbolic when batch shapes vary (see kernels/aot.py).
SWIGLU_CONFIG = (4096, 8)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        if n:
            block, warps = SWIGLU_CONFIG
            _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, y, n, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            block, warps = SWIGLU_CONFIG
            _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dy, g, u, dg, du, n, BLOCK=block, num_warps=warps)
        return dg, du


def swiglu(gate, up):
    """silu(gate) * up for two tensors of one shape -> that shape, in gate's dtype."""
    if gate.shape != up.shape or gate.device != up.device:
        raise ValueError(f"kernels/swiglu.py: gate and up must have one shape and device; got "
                         f"{tuple(gate.shape)} on {gate.device} and {tuple(up.shape)} on {up.device}")
    return SwiGLUFunction.apply(gate, up)


def traffic(kernel, grid, args):
    """Bytes one launch of `kernel` (a kernel of this file) reads and writes, per pointer argument:
    {name: (read, written)}. bench/launches.py uses it; tests/test_traffic.py checks it."""
    n = args["n_elements"]
    if kernel == "_swiglu_fwd_kernel":
        reads, writes = ("G", "U"), ("Y",)
    elif kernel == "_swiglu_bwd_kernel":
        reads, writes = ("DY", "G", "U"), ("DG", "DU")
    else:
        return None
    return {**{a: (n * args[a].element_size(), 0) for a in reads},
            **{a: (0, n * args[a].element_size()) for a in writes}}
