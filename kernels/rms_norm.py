"""RMSNorm and fused residual-add + RMSNorm in Triton, forward and backward.

    rms_norm:      y = x * rstd * w,                 rstd = 1 / sqrt(mean(x^2) + eps)   over the last dim H
    add_rms_norm:  h = round(x + r);  y = h * rstd * w                                     returns (h, y)

Math in float32 whatever the dtypes. rms_norm stores y in x.dtype; add_rms_norm stores h and y in the promoted dtype
of x and r (h rounded before it is normalised, as in kernels/reference.py), so an fp32 residual stream stays fp32.
The forward saves rstd (one float32 per row). With xhat = h * rstd and g = dy * w:

    dh = rstd * (g - xhat * mean(g * xhat))  (+ the incoming grad of h for add_rms_norm; x and r both get it)
    dw = sum over rows of dy * xhat          (per-program partial sums (P, H), then one torch sum: no atomics)

add_rms_norm's backward stores dh once per dtype: in x.dtype for x and, when it differs (under autocast: a bf16
sublayer output, the float32 residual stream), a second time in the residual's dtype, from the same kernel.

One program normalises one row (BLOCK = next power of two >= H, the tail masked). The backward runs P programs,
each looping over rows pid, pid + P, ... and keeping its dw partial in registers.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(X, R, H, W, Y, RSTD, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + r).to(H.dtype.element_ty)  # h is rounded to its dtype before the norm
        tl.store(H + offs, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DH, DX, DR, DW_PARTIAL, n_rows, n_cols,
                         HAS_DH: tl.constexpr, HAS_DR: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, n_rows, n_programs):
        offs = tl.cast(row, tl.int64) * n_cols + cols  # tl.cast: row is a Python int under the interpreter
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DR:  # the same gradient, in the residual's dtype
            tl.store(DR + offs, dx.to(DR.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def rms_norm_config(n_cols, element_size):
    """(BLOCK, num_warps) for rows of n_cols elements of element_size bytes: the whole row in one block, one
    16-byte vector per thread (8 bf16 or 4 fp32 elements; more per thread only past 16 warps)."""
    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(1, block * element_size // (16 * 32)))


def rms_norm_bwd_programs(n_rows, num_warps, device):
    """How many programs share the rows in the backward: enough for ~32 resident warps per SM (the op is memory
    bound), each writing one float32 dw partial row (a few MB at most, against >= 48 MB of dy, x, dx at 16k rows)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms * max(1, 32 // num_warps)))
    return max(1, min(n_rows, 4))  # interpreter: a few programs, so the partial-sum reduction is exercised


def _check(x, weight, residual=None):
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"kernels/rms_norm.py: weight must be ({x.shape[-1]},) to match x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"kernels/rms_norm.py: residual {tuple(residual.shape)} must have x's shape "
                         f"{tuple(x.shape)}")
    if x.device != weight.device or (residual is not None and residual.device != x.device):
        raise ValueError("kernels/rms_norm.py: x, residual and weight must be on one device")


def _forward(x, residual, weight, eps):
    """Launch the forward on 2D contiguous views. Returns (h or None, y, rstd, x2): h, y shaped like x; x2 the
    (N, H) contiguous input the kernel read."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols).contiguous()
    n_rows = x2.shape[0]
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty_like(x2, dtype=out_dtype)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    h = torch.empty_like(x2, dtype=out_dtype) if residual is not None else None
    r2 = residual.reshape(-1, n_cols).contiguous() if residual is not None else x2
    if n_rows:
        block, warps = rms_norm_config(n_cols, y.element_size())
        _rms_norm_fwd_kernel[(n_rows,)](x2, r2, h if h is not None else y, weight.contiguous(), y, rstd, n_cols,
                                        float(eps), HAS_RESIDUAL=residual is not None, BLOCK=block,
                                        num_warps=warps)
    return (None if h is None else h.view(x.shape)), y.view(x.shape), rstd, x2


def _backward(dy, x, weight, rstd, dh, dx_dtype, dr_dtype=None):
    """dy, x (N, H) contiguous; dh (N, H) or None. Returns (dx (N, H) in dx_dtype, dr (N, H) in dr_dtype or None
    when dr_dtype is None, dw in weight.dtype): dx and dr hold the same gradient, stored by the one kernel."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x, dtype=dx_dtype)
    dr = None if dr_dtype is None else torch.empty_like(x, dtype=dr_dtype)
    block, warps = rms_norm_config(n_cols, x.element_size())
    programs = rms_norm_bwd_programs(n_rows, warps, x.device)
    partial = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](dy, x, weight.contiguous(), rstd, dh if dh is not None else dy, dx,
                                          dr if dr is not None else dx, partial, n_rows, n_cols,
                                          HAS_DH=dh is not None, HAS_DR=dr is not None, BLOCK=block,
                                          num_warps=warps)
    else:
        partial.zero_()
    return dx, dr, partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        _, y, rstd, x2 = _forward(x, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, _, dw = _backward(dy.reshape(x2.shape).contiguous(), x2, weight, rstd, None, x2.dtype)
        return dx.view(dy.shape), dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        h, y, rstd, _ = _forward(x, residual, weight, eps)
        ctx.save_for_backward(h.view(-1, x.shape[-1]), weight, rstd)
        ctx.dtypes, ctx.shape = (x.dtype, residual.dtype), x.shape
        ctx.set_materialize_grads(False)  # an unused h (the final norm) gives dh = None: no zeros to read
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        h2, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h2)
        dh2 = None if dh is None else dh.reshape(h2.shape).contiguous()
        x_dtype, r_dtype = ctx.dtypes
        dx, dr, dw = _backward(dy.reshape(h2.shape).contiguous(), h2, weight, rstd, dh2, x_dtype,
                               None if r_dtype == x_dtype else r_dtype)
        # h = x + r, so x and r receive the same gradient: one tensor for both when their dtypes agree (autograd
        # copies before accumulating into an alias), else the kernel's second store in r's dtype
        dx = dx.view(ctx.shape)
        return dx, dx if dr is None else dr.view(ctx.shape), dw, None


def rms_norm(x, weight, eps=1e-5):
    """x (..., H), weight (H,) -> (..., H) in x.dtype. See the module docstring."""
    _check(x, weight)
    return RMSNormFunction.apply(x, weight, eps)


def add_rms_norm(x, residual, weight, eps=1e-5):
    """h = x + residual; y = rms_norm(h). Returns (h, y), both (..., H) in the promoted dtype of x and residual."""
    _check(x, weight, residual)
    return AddRMSNormFunction.apply(x, residual, weight, eps)


def traffic(kernel, grid, args):
    """Bytes one launch of `kernel` (a kernel of this file) reads and writes, per pointer argument:
    {name: (read, written)}, each distinct byte its tl.load / tl.store touch counted once (so W, re-read by every
    row, counts once). args: the launch's arguments by name. bench/launches.py uses it; tests/test_traffic.py
    checks it against the interpreter."""
    def size(name, n):
        return n * args[name].element_size()
    n_cols = args["n_cols"]
    if kernel == "_rms_norm_fwd_kernel":
        rows, res = grid[0], args["HAS_RESIDUAL"]
        return {"X": (size("X", rows * n_cols), 0), "R": (size("R", rows * n_cols) if res else 0, 0),
                "H": (0, size("H", rows * n_cols) if res else 0), "W": (size("W", n_cols), 0),
                "Y": (0, size("Y", rows * n_cols)), "RSTD": (0, size("RSTD", rows))}
    if kernel == "_rms_norm_bwd_kernel":
        rows, programs = args["n_rows"], grid[0]
        return {"DY": (size("DY", rows * n_cols), 0), "X": (size("X", rows * n_cols), 0), "W": (size("W", n_cols), 0),
                "RSTD": (size("RSTD", rows), 0), "DH": (size("DH", rows * n_cols) if args["HAS_DH"] else 0, 0),
                "DX": (0, size("DX", rows * n_cols)), "DR": (0, size("DR", rows * n_cols) if args["HAS_DR"] else 0),
                "DW_PARTIAL": (0, size("DW_PARTIAL", programs * n_cols))}
    return None
