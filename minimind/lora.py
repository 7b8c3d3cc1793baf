"""LoRA: low-rank adapters on a model's linear layers, MiniMind2-compatible.

A wrapped linear layer computes

    y = x W^T + s * (x A^T) B^T,      A (r, in) ~ N(0, 0.02^2),  B (out, r) = 0,  s = alpha / r

so at the start the model is unchanged. Only A and B train; everything else is frozen.

Key names. The adapter lives on the linear layer itself as a submodule `lora` with two bias-free linears `A` and
`B`, exactly like MiniMind2, so the base weight keeps its key (`model.layers.0.self_attn.q_proj.weight`) and the
adapter's keys are `model.layers.0.self_attn.q_proj.lora.A.weight` (r, in) and `...q_proj.lora.B.weight` (out, r).
An adapter file (`lora_state_dict`, saved as `out/lora/{name}_{hidden}.pth`) holds only those keys, with the
scale folded into B (B_file = s * B), so a file alone means delta_W = B_file @ A: MiniMind2's convention (it has no
alpha, s = 1). With the default alpha = rank, s = 1 and the stored B is the trained B bit for bit.

Targets. "square" (MiniMind2's choice, the default): every linear layer whose weight is square; with
grouped-query attention that is q_proj and o_proj. "all": every linear layer in the decoder blocks (q, k, v, o and
the MLP's gate, up, down, including shared experts), never the lm_head (tied to the embedding and read directly by
the fused loss) nor a MoE router; MoE routed experts are stacked tensors, not linear layers, and get no adapter.
Or a comma-separated list of layer names ("q_proj,v_proj") or full module names.

    apply_lora(model, rank=8, alpha=None, targets="square") -> names of the wrapped layers (freezes the rest)
    lora_state_dict(model) / load_lora(model, state_dict)       adapter weights only
    attach_lora(model, state_dict)                              wrap the layers a saved adapter names, then load it
    merge_lora(model) / unmerge_lora(model)                     fold delta_W into W and back (for inference)
    remove_lora(model, merge=True)                              plain nn.Linear layers again (MiniMind2 keys only)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

TARGET_CHOICES = ("square", "all")
_EXCLUDED = ("lm_head",)  # tied to the embedding and used by the fused loss without calling the module


class LoRAAdapter(nn.Module):
    """x -> B(A(x)); A (r, in), B (out, r). Named like MiniMind2's `LoRA` so state-dict keys match."""

    def __init__(self, in_features, out_features, rank, device=None, dtype=None, generator=None):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():  # drawn on the CPU from `generator` (or the global RNG): the same on every device
            self.A.weight.copy_(torch.randn(self.A.weight.shape, generator=generator) * 0.02)
        nn.init.zeros_(self.B.weight)

    def delta_weight(self):
        """B @ A: (out, in), in float32."""
        return self.B.weight.float() @ self.A.weight.float()

    def forward(self, x):
        return self.B(self.A(x))


class LoRALinear(nn.Linear):
    """A linear layer with a LoRA adapter. Shares (does not copy) the wrapped layer's weight and bias, so the
    base keys and tensors stay the same. While merged, W already holds W + s * B A and the adapter is skipped."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator=None):
        nn.Module.__init__(self)  # no fresh weight: reuse the base layer's parameters
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.merged = False
        self.lora = LoRAAdapter(self.in_features, self.out_features, rank,
                                device=base.weight.device, dtype=base.weight.dtype, generator=generator)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora(x) * self.scaling

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.scaling * self.lora.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.scaling * self.lora.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _is_target(name, module, targets):
    if not isinstance(module, nn.Linear):
        return False
    leaf = name.rsplit(".", 1)[-1]
    if leaf in _EXCLUDED or name.endswith("mlp.gate"):  # lm_head, MoE router
        return False
    if targets == "square":
        return module.weight.shape[0] == module.weight.shape[1]
    if targets == "all":
        return True
    return leaf in targets or name in targets


def parse_targets(targets):
    """"square" | "all" | "q_proj,v_proj" | a list of names -> "square", "all" or a set of layer names."""
    if isinstance(targets, str):
        if targets in TARGET_CHOICES:
            return targets
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = set(targets)
    if not names:
        raise ValueError(f"LoRA targets must be 'square', 'all' or layer names such as 'q_proj,v_proj'; "
                         f"got {targets!r}")
    return names


def lora_layers(model):
    """{module name: LoRALinear} for every adapted layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int = 8, alpha=None, targets="square", generator=None):
    """Wrap the target linear layers of `model` in LoRALinear (in place), freeze every other parameter, and
    return the wrapped layers' names. alpha None = rank (scale 1, MiniMind2's behaviour). generator: a CPU
    torch.Generator for the A matrices (default: the global RNG)."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; call remove_lora first")
    alpha = rank if alpha is None else alpha
    chosen = parse_targets(targets)
    names = [name for name, m in model.named_modules() if _is_target(name, m, chosen)]
    if not names:
        raise ValueError(f"no linear layer matches LoRA targets {targets!r}")
    if isinstance(chosen, set):
        unmatched = chosen - {n.rsplit(".", 1)[-1] for n in names} - set(names)
        if unmatched:
            raise ValueError(f"LoRA targets {sorted(unmatched)} match no linear layer in the model")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, generator))
    return names


def lora_parameters(model):
    """The adapter parameters (what the optimizer should train)."""
    return [p for m in lora_layers(model).values() for p in m.lora.parameters()]


def lora_state_dict(model):
    """Adapter weights only, MiniMind2 keys `{layer}.lora.A.weight` / `{layer}.lora.B.weight`, the scale folded
    into B (delta_W = B @ A). Tensors are detached copies in the model's dtype."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora.A.weight"] = m.lora.A.weight.detach().clone()
        out[f"{name}.lora.B.weight"] = (m.lora.B.weight.detach() * m.scaling).to(m.lora.B.weight.dtype)
    return out


@torch.no_grad()
def load_lora(model, state_dict):
    """Load adapter weights (from lora_state_dict or a MiniMind2 adapter file) into a model that apply_lora
    already wrapped. Every adapted layer must be present with matching shapes; unknown keys are an error."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters; call apply_lora(model, rank, ...) before load_lora")
    expected = {f"{n}.lora.{ab}.weight" for n in layers for ab in "AB"}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"LoRA state dict does not fit the model: missing {len(missing)} keys {missing[:4]}, "
                         f"unexpected {len(unexpected)} keys {unexpected[:4]}")
    for name, m in layers.items():
        if m.merged:
            raise ValueError(f"{name} is merged; unmerge_lora(model) before loading new adapter weights")
        A, B = state_dict[f"{name}.lora.A.weight"], state_dict[f"{name}.lora.B.weight"]
        if A.shape != m.lora.A.weight.shape or B.shape != m.lora.B.weight.shape:
            raise ValueError(f"{name}: adapter shapes A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                             f"A {tuple(m.lora.A.weight.shape)}, B {tuple(m.lora.B.weight.shape)} (rank {m.rank})")
        m.lora.A.weight.copy_(A)
        m.lora.B.weight.copy_(B.float() / m.scaling if m.scaling != 1.0 else B)


def attach_lora(model, state_dict):
    """Wrap exactly the layers an adapter file names, with its rank, and load it: the way to put a saved adapter
    on a plain base model. Returns the wrapped layers' names."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    names = sorted({k.rsplit(".lora.", 1)[0] for k in state_dict if ".lora." in k})
    if not names:
        raise ValueError("not a LoRA adapter state dict: no '.lora.' keys")
    rank = state_dict[f"{names[0]}.lora.A.weight"].shape[0]
    apply_lora(model, rank, alpha=rank, targets=names)  # the file's B already carries the scale
    load_lora(model, state_dict)
    return names


def merge_lora(model):
    """W <- W + s * B A in every adapted layer (forward then skips the adapters); reversible by unmerge_lora
    up to one float rounding per element."""
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model).values():
        m.unmerge()


def remove_lora(model, merge=True):
    """Replace every LoRALinear by a plain nn.Linear sharing its weight (merged first when merge=True, else the
    adapters are dropped), so state_dict() has MiniMind2's keys only. Returns the model."""
    for name, m in lora_layers(model).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, plain)
    return model
