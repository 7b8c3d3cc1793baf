"""MiniMind (MiniMind2 and minimind-3): a decoder-only transformer (dense or mixture-of-experts) on a switchable
kernel backend.

    x = embed(ids)
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + MLP(RMSNorm(x))     (MLP = SwiGLU or MoE)
    logits = RMSNorm(x) @ embed.T                                               (tied lm_head)

Attention is grouped-query with rotate-half RoPE; with config.qk_norm (minimind-3, as Qwen3) q and k are first
RMS-normalised over the head dim (`ops.qk_norm_rope`, one fused op). The hot ops come from
`kernels.get_backend(kernels)`; the model never branches on the backend. The residual add and the next norm go
through one fused op (`add_rms_norm`), and with labels the loss is `linear_cross_entropy` on the hidden states, so a
fused backend never builds the logits. State dicts use MiniMind's (Hugging Face Llama / Qwen3) key names
(`self_attn.q_norm.weight`, `self_attn.k_norm.weight` with q/k norm); MoE experts are stored stacked as (E, I, H)
inside and converted to MiniMind's one-module-per-expert keys on save and load.

`python -m minimind.model` prints every preset with its parameter count.
"""
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import get_backend
from minimind.config import PRESETS, MiniMindConfig


def rope_tables(head_dim, max_positions, theta=1e6, scaling=None):
    """cos, sin tables (max_positions, head_dim) in the rotate-half layout (each half's angles repeated twice).

    scaling: optional YaRN dict {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow"}. Dims
    whose wavelength is longer than the original context / beta_slow are interpolated by `factor`, dims shorter
    than original / beta_fast are kept, a linear ramp blends the ones between; cos and sin are scaled by
    0.1 * ln(factor) + 1 to keep attention entropy.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    mscale = 1.0
    if scaling:
        factor = float(scaling.get("factor", 4.0))
        orig = float(scaling.get("original_max_position_embeddings", 2048))
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))
        wavelength = 2 * math.pi / inv_freq
        rotations = orig / wavelength  # how many full turns each dim makes over the original context
        ramp = ((rotations - beta_slow) / max(beta_fast - beta_slow, 1e-6)).clamp(0, 1)  # 0 -> interpolate
        inv_freq = inv_freq / factor * (1 - ramp) + inv_freq * ramp
        mscale = 0.1 * math.log(factor) + 1.0
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, cfg: MiniMindConfig, ops, attn_impl):
        super().__init__()
        self.ops, self.attn_impl = ops, attn_impl
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def position(self, q, k, cos, sin):
        """RoPE of q (B, T, Hq, D) and k (B, T, Hkv, D) with rows 0..T-1 of cos/sin; q/k norm first if configured."""
        if self.q_norm is None:
            return self.ops.rope(q, k, cos, sin, 0)
        return self.ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, 0, self.q_norm.eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        """x (B, T, H) at positions 0..T-1 with cos, sin the whole tables; mask (B, 1, T, T) bool or None (None =
        plain causal). When generating, cache is one layer of a KVCache (minimind/kv_cache.py): each token has
        its own position and cos, sin are its rows (B * T, D). Returns out (B, T, H)."""
        B, T, _ = x.shape
        rows = (B, T) if cache is None else (1, B * T)  # rope works per "time" row: per-token positions as one row
        q = self.q_proj(x).view(*rows, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(*rows, self.n_kv, self.head_dim)
        q, k = self.position(q, k, cos, sin)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if cache is not None:
            out = cache.attend(q, k, v)
        elif (self.attn_impl == "flash" and mask is None and q.is_cuda
                and q.dtype in (torch.float16, torch.bfloat16)):  # flash-attn: CUDA, half precision only
            from flash_attn import flash_attn_func
            out = flash_attn_func(q, k, v, causal=True)
        else:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=self.n_kv != self.n_heads).transpose(1, 2)
        return self.o_proj(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: MiniMindConfig, ops):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


_EXPERT_WEIGHTS = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))


class MoEFeedForward(nn.Module):
    """Mixture of SwiGLU experts, MiniMind-style.

    scores = softmax(x @ gate.T) (N, E); the top-k experts per token, their scores renormalised to sum 1
    (norm_topk_prob; so minimind-3's top-1 weight is 1. MiniMind2's code skips it at k = 1, where it keeps the
    score: norm_topk_prob=False gives that; every MiniMind2 preset has k = 2);
    y = sum_k w_k * expert_k(x) + sum of the shared experts (unweighted; minimind-3 has none).
    Training adds an auxiliary load-balancing loss, P_e = mean score of expert e:
      "sequence" (MiniMind2): alpha * mean_b sum_e f_be * P_be, f_be = count of e in sequence b * E / (T * k),
                              P_be over sequence b
      "batch" (minimind-3):   alpha * E * sum_e load_e * P_e, load_e = count of e over the N tokens' k choices / N,
                              P_e over all N tokens
    Expert weights are stacked: w_gate, w_up (E, I, H), w_down (E, H, I).
    """

    def __init__(self, cfg: MiniMindConfig, ops):
        super().__init__()
        self.ops, self.top_k, self.norm_topk = ops, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.aux_scope = cfg.aux_loss_scope
        self.alpha, E, H, I = cfg.aux_loss_alpha, cfg.n_routed_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate = nn.Linear(H, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, I, H))
        self.w_up = nn.Parameter(torch.empty(E, I, H))
        self.w_down = nn.Parameter(torch.empty(E, H, I))
        self.shared_experts = nn.ModuleList(FeedForward(cfg, ops) for _ in range(cfg.n_shared_experts))
        self.register_state_dict_post_hook(_experts_to_minimind_keys)
        self.register_load_state_dict_pre_hook(_experts_from_minimind_keys)

    def route(self, x):
        """x (N, H) -> topk_idx (N, k), topk_weight (N, k) float32, scores (N, E) float32."""
        scores = self.gate(x).float().softmax(dim=-1)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1)
        if self.norm_topk and self.top_k == 1:  # w / w = 1 and its gradient is 0 (autograd of w / w gives rounding
            topk_weight = torch.ones_like(topk_weight)  # noise of the size of the aux loss's gradient instead)
        elif self.norm_topk:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, scores

    def forward(self, x):
        """x (B, T, H) -> (y (B, T, H), aux_loss scalar)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        topk_idx, topk_weight, scores = self.route(flat)
        y = self.ops.moe_experts(flat, topk_idx, topk_weight, self.w_gate, self.w_up, self.w_down).view(B, T, H)
        for expert in self.shared_experts:
            y = y + expert(x)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and self.alpha > 0:
            aux = self.aux_loss(topk_idx.view(B, T * self.top_k), scores.view(B, T, -1))
        return y, aux

    def aux_loss(self, chosen, scores):
        """chosen (B, T*k) expert ids, scores (B, T, E) -> the load-balancing loss of aux_scope (class docstring)."""
        B, T, E = scores.shape
        if self.aux_scope == "batch":
            load = torch.zeros(E, device=scores.device).index_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=scores.device)) / (B * T)
            return E * (load * scores.mean(dim=(0, 1))).sum() * self.alpha
        counts = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, chosen, torch.ones(chosen.shape, device=scores.device))
        f = counts / (T * self.top_k / E)
        return (f * scores.mean(dim=1)).sum(dim=1).mean() * self.alpha


def _experts_to_minimind_keys(module, state_dict, prefix, local_metadata):
    for name, key in _EXPERT_WEIGHTS:
        stacked = state_dict.pop(prefix + name)
        for j in range(stacked.shape[0]):
            state_dict[f"{prefix}experts.{j}.{key}.weight"] = stacked[j]


def _experts_from_minimind_keys(module, state_dict, prefix, *args):
    E = module.w_gate.shape[0]
    for name, key in _EXPERT_WEIGHTS:
        keys = [f"{prefix}experts.{j}.{key}.weight" for j in range(E)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MiniMindConfig, ops, attn_impl):
        super().__init__()
        self.ops = ops
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ops, attn_impl)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoEFeedForward(cfg, ops) if cfg.use_moe else FeedForward(cfg, ops)

    def forward(self, h, delta, cos, sin, mask=None, cache=None):
        """The residual stream h and the previous sublayer's output delta, not yet added (None in layer 0).
        Returns the new (h, delta, aux_loss); the caller adds the last delta in the final norm."""
        norm_in, norm_post = self.input_layernorm, self.post_attention_layernorm
        if delta is None:
            x = self.ops.rms_norm(h, norm_in.weight, norm_in.eps)
        else:
            h, x = self.ops.add_rms_norm(delta, h, norm_in.weight, norm_in.eps)
        a = self.self_attn(x, cos, sin, mask, cache)
        h, x = self.ops.add_rms_norm(a, h, norm_post.weight, norm_post.eps)
        if isinstance(self.mlp, MoEFeedForward):
            m, aux = self.mlp(x)
        else:
            m, aux = self.mlp(x), None
        return h, m, aux


def attention_mask_for(attention_mask):
    """Boolean (B, 1, T, T) mask from a (B, T) 0/1 key mask, causal by position.
    A query always sees itself, so a padded row never becomes all-masked (which would give NaN)."""
    T = attention_mask.shape[1]
    q_pos = torch.arange(T, device=attention_mask.device)[:, None]
    k_pos = torch.arange(T, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & attention_mask[:, None, :].bool()
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class MiniMindModel(nn.Module):
    def __init__(self, cfg: MiniMindConfig, ops, attn_impl):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops, attn_impl) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask=None, cache=None):
        """input_ids (B, T) -> (hidden (B, T, H) after the final norm, aux_loss). attention_mask (B, T) 0/1 hides
        pads. cache: a KVCache (minimind/kv_cache.py) set up for this forward when generating: it gives each
        token's position and holds every earlier token's keys and values."""
        B, T = input_ids.shape
        if T > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask_for(attention_mask)
        cos, sin = self.rope_cos, self.rope_sin
        if cache is not None:
            positions = cache.positions_for(input_ids.shape)
            cos, sin = cos.index_select(0, positions), sin.index_select(0, positions)
        h, delta = self.embed_tokens(input_ids), None
        aux = torch.zeros((), device=input_ids.device)
        for i, layer in enumerate(self.layers):
            h, delta, layer_aux = layer(h, delta, cos, sin, mask, None if cache is None else cache.layer(i))
            if layer_aux is not None:
                aux = aux + layer_aux
        _, out = self.ops.add_rms_norm(delta, h, self.norm.weight, self.norm.eps)
        return out, aux


@dataclass
class CausalLMOutput:
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss, what training minimises
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None  # None when a loss was computed and return_logits was not asked for


def shift_labels(labels, ignore_index=-100):
    """(B, T) labels aligned with input_ids -> targets for each position: labels[:, t + 1], ignore at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


class MiniMindForCausalLM(nn.Module):
    """MiniMind language model (MiniMind2 or minimind-3, by config). kernels: "torch" | "triton" | "liger";
    attn: "sdpa" | "flash"."""

    def __init__(self, config: MiniMindConfig, kernels: str = "torch", attn: str = "sdpa"):
        super().__init__()
        self.config = config
        self.ops = get_backend(kernels)
        attn = self._check_attn(attn)
        self.model = MiniMindModel(config, self.ops, attn)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.embed_tokens.weight = self.lm_head.weight
        self.apply(self._init_weights)

    @staticmethod
    def _check_attn(attn):
        if attn not in ("sdpa", "flash"):
            raise ValueError(f"attn must be 'sdpa' or 'flash', got {attn!r}")
        if attn == "flash":
            try:
                import flash_attn  # noqa: F401
                if torch.cuda.is_available():
                    return "flash"
                why = "no CUDA GPU"
            except ImportError:
                why = "flash-attn is not installed"
            warnings.warn(f"attn='flash' unavailable ({why}); using scaled_dot_product_attention")
        return "sdpa"

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, MoEFeedForward):
            for p in (module.w_gate, module.w_up, module.w_down):
                nn.init.normal_(p, std=0.02)

    def set_kernels(self, kernels: str):
        """Switch every module to another backend (same weights)."""
        ops = get_backend(kernels)
        for m in self.modules():
            if hasattr(m, "ops"):
                m.ops = ops

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, labels=None, attention_mask=None, loss_weights=None, return_logits=None,
                logits_to_keep=0):
        """input_ids (B, T); labels (B, T) aligned with input_ids, -100 where ignored (shifted here);
        loss_weights (B, T) per-label weights, aligned like labels. logits_to_keep: only the last n positions'
        logits (0 = all)."""
        hidden, aux = self.model(input_ids, attention_mask)
        out = CausalLMOutput(aux_loss=aux)
        if labels is not None:
            H = hidden.shape[-1]
            targets = shift_labels(labels).reshape(-1)
            weights = None if loss_weights is None else shift_labels(loss_weights, 0).reshape(-1)
            out.lm_loss = self.ops.linear_cross_entropy(hidden.reshape(-1, H), self.lm_head.weight, targets,
                                                        token_weights=weights)
            out.loss = out.lm_loss + aux
        if return_logits or (return_logits is None and labels is None):
            out.logits = self.lm_head(hidden[:, -logits_to_keep:])
        return out

    def token_logprobs(self, input_ids, labels, attention_mask=None):
        """(B, T) log p(labels[:, t] | tokens before t), aligned with labels, 0 where ignored (and at t = 0);
        plus the aux loss. Uses linear_logprobs, so a fused backend never builds the logits."""
        hidden, aux = self.model(input_ids, attention_mask)
        B, T, H = hidden.shape
        lp = self.ops.linear_logprobs(hidden.reshape(-1, H), self.lm_head.weight, shift_labels(labels).reshape(-1))
        return F.pad(lp.view(B, T)[:, :-1], (1, 0)), aux


def main():
    for name in PRESETS:
        cfg = MiniMindConfig.from_preset(name)
        with torch.device("meta"):
            n = MiniMindForCausalLM(cfg).num_parameters()
        generation = "minimind-3" if cfg.qk_norm else "MiniMind2"
        kind = "dense"
        if cfg.use_moe:
            shared = f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
            kind = f"moe {cfg.n_routed_experts} routed{shared} top-{cfg.num_experts_per_tok}"
        line = (f"{name:13s} {generation:10s} hidden {cfg.hidden_size:4d} layers {cfg.num_hidden_layers:2d} heads "
                f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}x{cfg.head_dim} {kind:29s} {n:>12,} parameters")
        if cfg.use_moe:
            per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
            idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert * cfg.num_hidden_layers
            line += f" ({n - idle:,} active per token)"
        print(line)


if __name__ == "__main__":
    main()
