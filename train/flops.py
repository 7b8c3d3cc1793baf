"""Model FLOPs utilisation, per useful token of a micro-batch of sequence length T (PaLM's convention):

    flops/token = 6 * N_matmul + 12 * L * d_attn * T                   the trained model, forward + backward
                + sum over frozen models F of (2 * N_F + 4 * L_F * d_F * T)          one forward each

N_matmul counts the weights of every matrix multiply a token goes through (attention and MLP projections, the
lm_head; for MoE the shared experts and k of the E routed experts); the embedding lookup is not a matmul.
12 * L * d_attn * T is QK^T and AV (2 * 2 * T * d_attn per layer forward, x3 with the backward), d_attn =
heads * head_dim. The frozen models F (L_F layers, d_F = its d_attn) are the ones a stage registers with
run.add_frozen (DPO's live reference, the distillation teacher): each runs one forward, no backward, over the same
tokens, a third of the training count.
DPO with --precompute_ref has none while training (its one pass over the data before training is not counted).
A stage may count its trained model its own way (Stage.flops_per_token): LoRA counts 4N for the frozen base
matrices (forward and the gradient of their input, no weight gradient) and 6N for the adapters, where PaLM would
count 6N for every weight. MFU = achieved flops/s / (processes * peak dense bf16 tensor flops/s of one device),
counting only useful (non-pad) tokens, so padding shows up as lost MFU.
"""
import torch
import torch.nn as nn


# Dense bf16/fp16 tensor-core peak of one device, TFLOP/s (vendor datasheets, no sparsity). Matched by substring of
# torch.cuda.get_device_name(), most specific first.
PEAK_TFLOPS = [
    ("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("RTX A6000", 155.0), ("V100", 125.0), ("T4", 65.0),
]


def peak_flops(device, override_tflops=None):
    """Peak flop/s of one device, or None when unknown (CPU, an unlisted GPU): MFU is then shown as n/a."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def matmul_params(model: nn.Module) -> int:
    """Weights a token is multiplied by on its way through the model (see the module docstring)."""
    from minimind.model import MoEFeedForward
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
        elif isinstance(m, MoEFeedForward):
            per_expert = m.w_gate[0].numel() + m.w_up[0].numel() + m.w_down[0].numel()
            n += m.top_k * per_expert
    return n


def default_flops_per_token(model, seq_len, n_matmul=None):
    """6 * N_matmul + 12 * L * d_attn * T (see the module docstring); pass n_matmul to skip counting it."""
    cfg = model.config
    n_matmul = matmul_params(model) if n_matmul is None else n_matmul
    return 6 * n_matmul + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def forward_flops_per_token(model, seq_len, n_matmul=None):
    """2 * N_matmul + 4 * L * d_attn * T: one forward of a frozen model, a third of default_flops_per_token."""
    cfg = model.config
    n_matmul = matmul_params(model) if n_matmul is None else n_matmul
    return 2 * n_matmul + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len


def run_flops_per_token(stage, model, run):
    """T -> flops per useful token of one micro-batch of length T (see the module docstring): the trained model's
    forward + backward (stage.flops_per_token or the default) plus one forward of each of run.frozen_models()."""
    n_matmul = matmul_params(model)
    trained = stage.flops_per_token or (lambda m, T: default_flops_per_token(m, T, n_matmul))
    frozen = [(m, matmul_params(m)) for m in run.frozen_models()]
    return lambda T: trained(model, T) + sum(forward_flops_per_token(m, T, n) for m, n in frozen)
