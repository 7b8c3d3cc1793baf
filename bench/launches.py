"""What one training step launches on a GPU, counted on a CPU: every kernel, the bytes it moves and its FLOPs.

    from bench import launches
    step = launches.count_step("small", "triton", sms=82)     # a StepCount: .launches (one Launch per ATen op or
    step.totals()                                             # Triton launch), totals, per-op summaries

The step is bench.throughput's (TrainStep: the engine's train_step: forward, loss, backward, clip, AdamW) at a
MiniMind batch, run on fake tensors (torch's FakeTensorMode: shapes, dtypes and strides, no data, no arithmetic),
with the state a first step leaves (AdamW's moments, the GradScaler's scale) made beforehand. A dispatch mode below
autograd sees every ATen op, and a patched Triton launcher sees every kernel launch with its grid and arguments (the
kernel never runs, so no Triton kernel runs at full size under the interpreter; its outputs are the fake tensors
its wrapper allocated).

Launches. An ATen op launches a kernel when it writes a tensor: it returns one that is not a view of an input, or
it writes an argument in place. Views, metadata and allocation (torch.empty) launch nothing. Most ops are one CUDA
kernel; the exceptions: multi-tensor ops (torch._foreach_*, fused AdamW, the GradScaler's
unscale) launch one kernel per 320 chunks of 65,536 elements or per 110/64/48/36/30 tensors (1-5 tensor lists), as
ATen's multi_tensor_apply does; FlashAttention-2's backward is 3 kernels (+2 summing the expanded dk, dv under
GQA); a boolean mask index costs a nonzero() (1 kernel) and a host sync first; embedding's backward (a sort of the
ids, then segment sums: ~8) and sort (~4) are estimates. A host read of a device value (.item(), bool(t)) is a
sync, not a kernel.

Bytes, per launch. Triton: the kernel file's own `traffic(kernel, grid, args)` formula (each distinct byte its
loads and its stores touch, once; tests/test_traffic.py checks every formula against the interpreter); a kernel
without one (liger's) counts each tensor argument once, as read ("estimate"). ATen: each tensor argument read once
(the distinct elements of a broadcast view; gathers read as many rows as they return) and each output or in-place
argument written once; an argument an op only overwrites (copy_, fill_, zero_) is not read. Flash attention adds
its backward's float32 dq accumulator, its preprocessing pass over dO and O and, under GQA, the expanded dk, dv.

FLOPs, as executed (recomputation included). ATen: torch.utils.flop_counter's formulas (matmuls; attention: QK^T
and AV as full squares, the backward with its recomputation). Triton: the kernel file's `flops(kernel, grid, args)`
where it has one (the MoE grouped GEMMs, whose backward recomputes gate and up). exec_flops is what a GPU spends
time on: causal attention skips about half of the square.

Where the CPU run departs from CUDA, and how `as_on_cuda(sms)` brings it back:
- tensors live on a fake CPU device, so CPU autocast stands in for CUDA's: both run matmuls and attention in the
  autocast dtype, and the model casts to float32 by itself wherever their lists differ;
- Tensor.is_cuda answers True, so the kernels' device branches take their GPU path (device-side asserts instead
  of host syncs); TRITON_INTERPRET is hidden, so they pick their GPU block sizes; rms_norm's backward sizes its
  grid from the GPU's SM count (`sms`);
- the optimizer is fused AdamW, as TrainStep builds it on CUDA, and gradient clipping takes the multi-tensor
  (foreach) path, as on CUDA (fake tensors would otherwise send it to a per-tensor loop);
- SDPA runs CPU's flash kernel, counted as CUDA's FlashAttention-2 (same inputs, outputs and FLOPs);
- a host read returns 0 (no overflow, no bad label); a boolean mask selects mask.numel() * mask_fraction rows
  (the step sets 1 / experts: MiniMind2's per-expert loop with balanced routing).
"""
import contextlib
import importlib
import inspect
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten
LABEL = "bench_op"  # autograd node metadata key: the backend op that created the node

# ATen ops that write a tensor but launch no kernel (allocation, metadata)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
             "set_", "resize_", "resize_as_", "record_stream", "_local_scalar_dense"}
ALWAYS_KERNEL = {"_assert_async"}                    # a device-side check: a kernel that writes nothing
OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_"}  # self written, not read
GATHER = {"embedding", "index", "index_select", "gather"}  # read the rows they return (+ the indices), not all
MULTI_TENSOR = ("_foreach_", "_fused_adam", "_fused_sgd", "_amp_foreach_non_finite_check_and_unscale_")
ESTIMATED_KERNELS = {"embedding_dense_backward": 8, "sort": 4}
FLASH_FORWARD = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"}
FLASH_BACKWARD = {"_scaled_dot_product_flash_attention_for_cpu_backward",
                  "_scaled_dot_product_flash_attention_backward"}
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm"}


@dataclass
class Launch:
    """One ATen op or Triton launch of the step: `kernels` GPU kernels (0 for a pure host sync)."""
    name: str                 # aten.mm.default, or the Triton kernel's name
    kind: str                 # "aten" | "triton" | "sync"
    phase: str                # "forward" | "backward" | "optimizer"
    op: str                   # the backend op it belongs to (rms_norm, ...) or a class of ATen op (matmul, ...)
    kernels: int = 1
    read: int = 0             # bytes
    written: int = 0
    flops: int = 0
    exec_flops: int = 0
    syncs: int = 0
    grid: tuple = None
    traffic: str = "sizes"    # "sizes" (ATen), "formula" (the kernel file's), "estimate"

    @property
    def bytes(self):
        return self.read + self.written


def footprint(t):
    """Bytes of the distinct elements a tensor view addresses (a broadcast dimension, stride 0, counts once)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _named(func, args, kwargs):
    """[(schema argument, value)] of an ATen call."""
    return [(a, args[i] if not a.kwarg_only and i < len(args) else kwargs.get(a.name, a.default_value))
            for i, a in enumerate(func._schema.arguments)]


def multi_tensor_kernels(lists):
    """Kernels ATen's multi_tensor_apply launches over `lists` (tensor lists of equal length): a launch whenever
    320 chunks of 65,536 elements or 110/64/48/36/30 tensors (for 1..5 lists) are queued, and at the end."""
    depth = max(1, min(len(lists), 5))
    max_tensors, max_blocks, chunk = (110, 64, 48, 36, 30)[depth - 1], 320, 65536
    launches = tensors = blocks = 0
    for t in lists[0] if lists else []:
        if t.numel() == 0:
            continue
        tensors += 1
        chunks = math.ceil(t.numel() / chunk)
        for c in range(chunks):
            blocks += 1
            if blocks == max_blocks or (tensors == max_tensors and c == chunks - 1):
                launches += 1
                blocks = 0
                tensors = 0 if c == chunks - 1 else 1
    return launches + (1 if blocks else 0)


def _category(name, node):
    """A class for an ATen op (or Triton kernel) outside any backend op."""
    if not name.startswith("aten."):
        return "other Triton" if "." not in name else "other"
    packet = name.split(".")[1]
    if packet in MATMULS:
        return "matmul"
    if "attention" in packet:
        return "attention"
    if packet.startswith("embedding"):
        return "embedding"
    if node is not None and "AccumulateGrad" in node.name():
        return "grad accumulation"
    if packet in ("_to_copy", "copy_", "clone"):
        return "casts and copies"
    return "other ATen"


class LaunchCounter(TorchDispatchMode):
    """Records a Launch for every ATen op that launches a kernel (and for every Triton launch reported by
    intercept_triton). Enter it inside a FakeTensorMode.

    mask_fraction: the share of a boolean mask taken to be True (a fake tensor has no values); None makes
    boolean-mask indexing an error. allocations: (bytes, label) of every tensor an op returned, views excluded."""

    def __init__(self, mask_fraction=None):
        super().__init__()
        self.launches, self.allocations = [], []
        self.mask_fraction = mask_fraction
        self.op = None               # the backend op running (set by label_backend_ops)
        self.backward_started = False

    def phase(self):
        node = torch._C._current_autograd_node()
        if node is not None:
            self.backward_started = True
            return "backward", node
        return ("optimizer" if self.backward_started else "forward"), None

    def label(self, name, node):
        if self.op is not None:
            return self.op
        if node is not None and node.metadata.get(LABEL):
            return node.metadata[LABEL]
        if self.backward_started and node is None:
            return "optimizer"
        return _category(name, node)

    def add(self, launch):
        self.launches.append(launch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.equal.default):  # a value read back: 0, not equal
            phase, node = self.phase()
            equal = func is aten.equal.default  # compares on the device (a kernel), then reads the answer back
            self.add(Launch(str(func), "sync", phase, self.label(str(func), node), kernels=int(equal),
                            read=sum(map(footprint, args)), syncs=1))
            return False if equal or args[0].dtype == torch.bool else 0
        if func.__name__.split(".")[0] in ("index", "index_put", "index_put_", "_index_put_impl_"):
            args = self._boolean_indices(func, args)
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _boolean_indices(self, func, args):
        """A boolean mask index becomes mask.numel() * mask_fraction row indices, after the nonzero() and the
        host sync that CUDA spends on it."""
        indices = list(args[1])
        for i, mask in enumerate(indices):
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
                if self.mask_fraction is None or mask.dim() != 1:
                    raise NotImplementedError(f"bench/launches.py: {func} with a {mask.dim()}-d boolean mask: a "
                                              "fake tensor has no values (set mask_fraction for 1-d masks)")
                rows = int(mask.numel() * self.mask_fraction)
                phase, node = self.phase()
                self.add(Launch("aten.nonzero.default", "aten", phase, self.label("aten.nonzero", node),
                                read=footprint(mask), written=rows * 8, syncs=1))
                indices[i] = torch.zeros(rows, dtype=torch.long, device=mask.device)
        return (args[0], indices, *args[2:])

    def _record(self, func, args, kwargs, out):
        schema, packet = func._schema, func.__name__.split(".")[0]
        read, written, lists = [], [], []
        for a, value in _named(func, args, kwargs):
            tensors = _tensors(value)
            if isinstance(value, (list, tuple)) and tensors:
                lists.append(tensors)
            writes = a.alias_info is not None and a.alias_info.is_write
            if writes:
                written += tensors
            if not (a.is_out or (writes and packet in OVERWRITE)):
                read += tensors
        fresh = [t for r, o in zip(schema.returns, out if isinstance(out, (tuple, list)) and len(schema.returns) > 1
                                   else [out]) if r.alias_info is None for t in _tensors(o)]
        phase, node = self.phase()
        label = self.label(str(func), node)
        self.allocations += [(footprint(t), label) for t in fresh]
        if func.namespace != "aten" or packet in NO_KERNEL or not (fresh or written or packet in ALWAYS_KERNEL):
            return
        written += fresh
        if packet in GATHER:  # the indices and as many rows as come out
            read = [t for t in read if not t.is_floating_point()] + fresh
        launch = Launch(str(func), "aten", phase, label, read=sum(map(footprint, read)),
                        written=sum(map(footprint, written)))
        if packet.startswith(MULTI_TENSOR):
            # fused AdamW's per-parameter step counters ride along outside multi_tensor_apply's lists
            full_size = [l for l in lists if l[0].dim() > 0] or lists
            launch.kernels = multi_tensor_kernels(full_size) + (packet == "_foreach_norm")
        elif packet in ESTIMATED_KERNELS:
            launch.kernels = ESTIMATED_KERNELS[packet]
        packet_op = getattr(aten, packet, None)
        if packet_op in flop_registry:
            launch.flops = launch.exec_flops = int(flop_registry[packet_op](*args, **kwargs, out_val=out))
        if packet in FLASH_FORWARD or packet in FLASH_BACKWARD:
            _flash_attention(launch, packet, {a.name: v for a, v in _named(func, args, kwargs)})
        self.add(launch)

    def triton(self, kernel, grid, args):
        """A Triton launch (from intercept_triton): bytes and FLOPs from the kernel file's formulas."""
        name = kernel.fn.__name__
        module = importlib.import_module(kernel.fn.__module__)
        if "OFFSETS" in args and "PERM" in args and isinstance(args["OFFSETS"], FakeTensor):
            E, M = args["OFFSETS"].numel() - 1, args["PERM"].numel()  # no routing data: balanced
            args = {**args, "expert_rows": [M // E + (e < M % E) for e in range(E)]}
        traffic = getattr(module, "traffic", None)
        per_arg = traffic(name, grid, args) if traffic else None
        phase, node = self.phase()
        launch = Launch(name, "triton", phase, self.label(name, node), grid=tuple(grid))
        if per_arg is None:
            launch.read, launch.traffic = sum(footprint(t) for t in args.values() if torch.is_tensor(t)), "estimate"
        else:
            launch.read = sum(r for r, _ in per_arg.values())
            launch.written = sum(w for _, w in per_arg.values())
            launch.traffic = "formula"
        flops = getattr(module, "flops", None)
        launch.flops = launch.exec_flops = int((flops(name, grid, args) if flops else 0) or 0)
        self.add(launch)


def _flash_attention(launch, packet, args):
    """Count SDPA's flash kernel (CPU's or CUDA's) as FlashAttention-2 on CUDA: q, k, v (B, H, T, D); args by
    name."""
    backward = packet in FLASH_BACKWARD
    q, k, v, grad_out = args["query"], args["key"], args["value"], args.get("grad_out")
    causal = bool(args["is_causal"])
    launch.name = "aten._scaled_dot_product_flash_attention" + ("_backward" if backward else "") + ".default"
    # k and v counted at the query's head count, as GQA computes them (torch 2.11's formulas refuse GQA's shapes)
    k_shape, v_shape = (*k.shape[:1], q.shape[1], *k.shape[2:]), (*v.shape[:1], q.shape[1], *v.shape[2:])
    if backward:
        launch.flops = sdpa_backward_flop_count(grad_out.shape, q.shape, k_shape, v_shape)
        B, Hq, T, D = q.shape
        gqa = k.shape[1] != Hq
        launch.kernels = 3 + 2 * gqa
        # the float32 dq accumulator (written, read), the preprocessing pass (dO and O read, D written) and,
        # under GQA, dk and dv expanded to every query head (written, then read by the two sums)
        extra_read = B * Hq * T * D * (4 + 2 * q.element_size()) + (2 * B * Hq * T * D * k.element_size() if gqa
                                                                   else 0)
        launch.read += extra_read
        launch.written += B * Hq * T * D * 4 + B * Hq * T * 4 + (2 * B * Hq * T * D * k.element_size() if gqa
                                                                 else 0)
    else:
        launch.flops = sdpa_flop_count(q.shape, k_shape, v_shape)
    launch.exec_flops = launch.flops // 2 if causal else launch.flops


@contextlib.contextmanager
def intercept_triton(counter):
    """Triton launches go to counter.triton(kernel, grid, args by name) instead of running."""
    from triton.runtime.jit import JITFunction
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        params = inspect.signature(self.fn).parameters
        bound = inspect.signature(self.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
        bound.apply_defaults()
        named = dict(bound.arguments)
        counter.triton(self, tuple(grid(named) if callable(grid) else grid), named)
        return None

    with contextlib.ExitStack() as stack:
        for cls in classes:
            stack.enter_context(mock.patch.object(cls, "run", run))
        yield


@contextlib.contextmanager
def as_on_cuda(sms):
    """The CUDA choices of the code the step runs, on fake CPU tensors (see the module docstring)."""
    from kernels import rms_norm
    programs = rms_norm.rms_norm_bwd_programs
    props = SimpleNamespace(multi_processor_count=sms)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.Tensor, "is_cuda", property(lambda self: True)))
        stack.enter_context(mock.patch.dict(os.environ, env, clear=True))
        stack.enter_context(mock.patch("torch.cuda.get_device_properties", lambda device=None: props))
        stack.enter_context(mock.patch.object(rms_norm, "rms_norm_bwd_programs",
                                              lambda rows, warps, device: programs(rows, warps, torch.device("cuda"))))
        stack.enter_context(mock.patch("torch.utils._foreach_utils._foreach_supported_types",
                                       [torch.Tensor, FakeTensor]))
        yield


class _NoRandomInit(TorchDispatchMode):
    """Weight initialisation draws nothing on fake tensors (their values do not exist)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.uniform_.default, aten.normal_.default):
            return args[0]
        return func(*args, **(kwargs or {}))


def _label_graph(outputs, inputs, name):
    """Mark the autograd nodes a backend op created (from its outputs back to its inputs' nodes) with its name,
    so that the backward's launches are counted as that op's."""
    boundary = {id(t.grad_fn) for t in _tensors(inputs) if t.grad_fn is not None}
    todo = [t.grad_fn for t in _tensors(outputs) if t.grad_fn is not None]
    seen = set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or id(node) in boundary or "AccumulateGrad" in node.name() \
                or node.metadata.get(LABEL):
            continue
        seen.add(id(node))
        node.metadata[LABEL] = name
        todo += [n for n, _ in node.next_functions]


@contextlib.contextmanager
def label_backend_ops(ops, counter):
    """Every op of the backend namespace `ops` tells the counter it is running (forward) and labels the autograd
    nodes it creates (backward)."""
    from kernels.backend import OPS

    def wrap(name, fn):
        def labelled(*args, **kwargs):
            outer = counter.op
            counter.op = outer or name
            try:
                out = fn(*args, **kwargs)
            finally:
                counter.op = outer
            if outer is None:
                _label_graph(out, args, name)
            return out
        return labelled

    with contextlib.ExitStack() as stack:
        for name in OPS:
            stack.enter_context(mock.patch.object(ops, name, wrap(name, getattr(ops, name))))
        yield


@dataclass
class StepCount:
    """The launches of one training step and what it trains on."""
    preset: str
    variant: str
    sms: int
    batch_size: int
    seq_len: int
    useful_tokens: int
    flops_per_token: float       # the engine's MFU count per useful token
    launches: list = field(default_factory=list)

    def totals(self, launches=None):
        ls = self.launches if launches is None else launches
        return {"launches": sum(l.kernels for l in ls), "syncs": sum(l.syncs for l in ls),
                "read": sum(l.read for l in ls), "written": sum(l.written for l in ls),
                "bytes": sum(l.bytes for l in ls), "flops": sum(l.flops for l in ls),
                "exec_flops": sum(l.exec_flops for l in ls),
                "triton_launches": sum(l.kernels for l in ls if l.kind == "triton")}

    def by(self, key):
        """{value of key (phase, op, name, kind): totals over the launches with that value}."""
        groups = {}
        for l in self.launches:
            groups.setdefault(getattr(l, key), []).append(l)
        return {k: self.totals(v) for k, v in groups.items()}


def build_step(cfg, variant_name, fake_mode):
    """bench.throughput's TrainStep for cfg and the variant, built on fake CPU tensors, with the optimizer it has
    on CUDA (fused AdamW)."""
    from bench import throughput
    with fake_mode, _NoRandomInit(), mock.patch.object(torch.nn.Module, "to", lambda self, *a, **k: self):
        step = throughput.TrainStep(cfg, throughput.VARIANTS[variant_name], torch.device("cpu"))
        d = step.optimizer.defaults
        step.optimizer = torch.optim.AdamW(step.params, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                           weight_decay=d["weight_decay"], fused=True)
    return step


def count_step(preset, variant, sms, batch_size=32, seq_len=512, pad_fraction=0.5, cfg=None):
    """Count one steady-state training step of `variant` (bench.throughput.VARIANTS) for the preset (or cfg) on
    a GPU with `sms` multiprocessors. Returns a StepCount."""
    from bench import throughput
    from minimind.config import MiniMindConfig
    from train import flops
    cfg = cfg or MiniMindConfig.from_preset(preset)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    step = build_step(cfg, variant, fake)
    batch, useful = throughput.make_batch(cfg, batch_size, seq_len, throughput.VARIANTS[variant].padded,
                                          pad_fraction)
    batch = {k: fake.from_tensor(v) for k, v in batch.items()}
    counter = LaunchCounter(mask_fraction=1 / cfg.n_routed_experts if cfg.use_moe else None)
    with as_on_cuda(sms), intercept_triton(counter), fake:
        for p in step.params:  # the state a first step leaves: AdamW's moments, the GradScaler's scale
            p.grad = torch.empty_like(p)
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
        if step.scaler is not None:
            step.scaler.scale(torch.ones(()))
        with counter, label_backend_ops(step.model.ops, counter):
            step(batch)
    return StepCount(preset, variant, sms, batch_size, seq_len, useful,
                     flops.default_flops_per_token(step.model, seq_len), counter.launches)


# ------------------------------------------------------------------------------------ one op and its minimum

@dataclass
class Shapes:
    """One MiniMind layer's tensors at a training step: `act` for sublayer outputs (matmul results under
    autocast), `stream` for the residual stream (float32 under autocast: the parameters are float32)."""
    hidden: int
    tokens: int = 32 * 512
    seq: int = 512
    heads: int = 8
    kv_heads: int = 2
    act: torch.dtype = torch.bfloat16
    stream: torch.dtype = torch.float32
    intermediate_size: Optional[int] = None  # None: MiniMind2's rule of hidden
    head_size: Optional[int] = None          # None: hidden / heads

    @property
    def inter(self):
        return self.intermediate_size or 64 * math.ceil(int(8 * self.hidden / 3) / 64)

    @property
    def head_dim(self):
        return self.head_size or self.hidden // self.heads

    def rows(self, width, dtype):
        return torch.empty(self.tokens, width, dtype=dtype, requires_grad=True)

    def weight(self, width):
        return torch.empty(width, requires_grad=True)

    def heads_of(self, n):
        return torch.empty(self.tokens // self.seq, self.seq, n, self.head_dim, dtype=self.act, requires_grad=True)

    def rope_tables(self):
        return [torch.empty(self.seq, self.head_dim), torch.empty(self.seq, self.head_dim)]


# The memory-bound ops the CI guard holds to 1.1 x their minimum traffic: name -> (the op's inputs at one layer's
# shapes, the tensors its backward must read besides the output gradients). One line per op.
GUARDED_OPS = {
    "rms_norm": (lambda s: [s.rows(s.hidden, s.stream), s.weight(s.hidden)], lambda ins, outs: ins),
    "add_rms_norm": (lambda s: [s.rows(s.hidden, s.act), s.rows(s.hidden, s.stream), s.weight(s.hidden)],
                     lambda ins, outs: [outs[0], ins[2]]),
    "rope": (lambda s: [s.heads_of(s.heads), s.heads_of(s.kv_heads), *s.rope_tables()], lambda ins, outs: ins[2:]),
    "qk_norm_rope": (lambda s: [s.heads_of(s.heads), s.heads_of(s.kv_heads), s.weight(s.head_dim),
                                s.weight(s.head_dim), *s.rope_tables()], lambda ins, outs: ins),
    "swiglu": (lambda s: [s.rows(s.inter, s.act), s.rows(s.inter, s.act)], lambda ins, outs: ins),
}


@dataclass
class OpCount:
    """One backend op's forward and backward at given inputs: its launches (those of autograd's gradient
    accumulation into the leaf inputs are counted but are not the op's) and the least traffic it could have."""
    name: str
    launches: list
    minimum_forward: int
    minimum_backward: int
    allocations: list

    def bytes(self, phase=None):
        return sum(l.bytes for l in self.launches if l.op == self.name and phase in (None, l.phase))

    @property
    def ratio(self):
        return self.bytes() / (self.minimum_forward + self.minimum_backward)


def count_op(name, make_inputs, backward_reads=None, backend="triton", sms=132, mask_fraction=None, autocast=None):
    """Forward and backward of backend op `name` on make_inputs() (fake tensors, made inside), counted; under
    autocast to that dtype when given (as the engine runs the model).
    The minimum: forward reads every input once and writes every output once; backward reads the output
    gradients and backward_reads(inputs, outputs) (default: the inputs) and writes the inputs' gradients."""
    from kernels import get_backend
    ops = get_backend(backend)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    counter = LaunchCounter(mask_fraction)
    with as_on_cuda(sms), intercept_triton(counter), fake, label_backend_ops(ops, counter):
        inputs = make_inputs()
        with counter, (torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()):
            outputs = _tensors(getattr(ops, name)(*inputs))
        grads = [torch.empty_like(o) for o in outputs if o.requires_grad]
        with counter:
            torch.autograd.backward([o for o in outputs if o.requires_grad], grads)
    needed = (backward_reads or (lambda ins, outs: ins))(inputs, outputs)
    minimum_forward = sum(map(footprint, _tensors(inputs))) + sum(map(footprint, outputs))
    minimum_backward = (sum(map(footprint, grads)) + sum(map(footprint, _tensors(needed)))
                        + sum(footprint(t) for t in _tensors(inputs) if t.requires_grad))
    return OpCount(name, counter.launches, minimum_forward, minimum_backward, counter.allocations)


def count_guarded_op(name, shapes, sms=132):
    make, backward_reads = GUARDED_OPS[name]
    return count_op(name, lambda: make(shapes), backward_reads, sms=sms)
