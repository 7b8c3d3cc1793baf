"""MiniMindConfig: the shape of a MiniMind2 model, as a plain dataclass.

The three MiniMind2 presets (see `MiniMindConfig.from_preset`):

    small : hidden 512, 8 layers                      -> 25,829,888 parameters
    base  : hidden 768, 16 layers                     -> 104,030,976 parameters
    moe   : hidden 640, 8 layers, 4 routed + 1 shared -> 145,029,760 parameters

All share 8 query heads, 2 key/value heads, vocab 6400, RoPE theta 1e6 and tied embeddings.
"""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional


@dataclass
class MiniMindConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = 6400
    intermediate_size: Optional[int] = None  # None -> 64 * ceil(int(8 * hidden / 3) / 64)
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None  # YaRN: {"factor": 4, "original_max_position_embeddings": 2048, ...}
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Mixture of experts (MiniMind2-MoE: 4 routed + 1 shared, top-2).
    use_moe: bool = False
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.1
    extra: dict = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(int(self.hidden_size * 8 / 3) / 64)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                             f"[1, n_routed_experts={self.n_routed_experts}]")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MiniMindConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiniMindConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MiniMindConfig fields: {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "small": dict(hidden_size=512, num_hidden_layers=8),
    "base": dict(hidden_size=768, num_hidden_layers=16),
    "moe": dict(hidden_size=640, num_hidden_layers=8, use_moe=True),
}
