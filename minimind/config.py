"""MiniMindConfig: the shape of a MiniMind model (MiniMind2 or minimind-3), as a plain dataclass.

The presets (see `MiniMindConfig.from_preset`; `python -m minimind.model` prints them):

    MiniMind2   small         : hidden 512, 8 layers, 8 / 2 heads                     -> 25,829,888 parameters
                base          : hidden 768, 16 layers, 8 / 2 heads                    -> 104,030,976 parameters
                moe           : hidden 640, 8 layers, 4 routed + 1 shared, top-2      -> 145,029,760 parameters
    minimind-3  minimind3     : hidden 768, 8 layers, 8 / 4 heads of 96, q/k norm     -> 63,912,192 parameters
                minimind3-moe : the same with 4 routed experts, top-1, no shared one  -> 198,416,640 parameters

All share vocab 6400, RoPE theta 1e6 and tied embeddings. What minimind-3 changed, field by field:

    qk_norm            RMSNorm over the head dim of q and k (one weight of head_dim each), before RoPE
    head_dim           its own field (None -> hidden / q heads); the RoPE tables are built for it
    rms_norm_eps       1e-6 (MiniMind2: 1e-5)
    intermediate_rule  how intermediate_size=None is filled in: "minimind2" 64 * ceil(int(8 * hidden / 3) / 64),
                       "minimind3" 64 * ceil(hidden * pi / 64) (768 -> 2432); a preset keeps its rule when
                       --hidden_size is overridden
    n_shared_experts   0 (MiniMind2: 1), num_experts_per_tok 1 (MiniMind2: 2)
    aux_loss_scope     "batch": alpha * E * sum_e load_e * P_e over all the tokens of the batch, alpha 5e-4;
                       MiniMind2's "sequence": alpha * mean_b sum_e f_be * P_be, alpha 0.1 (see minimind.model)
"""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

INTERMEDIATE_RULES = {
    "minimind2": lambda hidden: 64 * math.ceil(int(hidden * 8 / 3) / 64),
    "minimind3": lambda hidden: 64 * math.ceil(hidden * math.pi / 64),
}
AUX_LOSS_SCOPES = ("sequence", "batch")


@dataclass
class MiniMindConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None -> hidden_size // num_attention_heads
    qk_norm: bool = False  # minimind-3: RMSNorm of q and k over the head dim before RoPE
    vocab_size: int = 6400
    intermediate_size: Optional[int] = None  # None -> INTERMEDIATE_RULES[intermediate_rule](hidden_size)
    intermediate_rule: str = "minimind2"
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rope_scaling: Optional[dict] = None  # YaRN: {"factor": 4, "original_max_position_embeddings": 2048, ...}
    rms_norm_eps: float = 1e-5
    dropout: float = 0.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # Mixture of experts (MiniMind2-MoE: 4 routed + 1 shared, top-2; minimind-3-MoE: 4 routed, top-1).
    use_moe: bool = False
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    aux_loss_alpha: float = 0.1
    aux_loss_scope: str = "sequence"  # "sequence" (MiniMind2) | "batch" (minimind-3)
    extra: dict = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self):
        if self.intermediate_rule not in INTERMEDIATE_RULES:
            raise ValueError(f"intermediate_rule must be one of {sorted(INTERMEDIATE_RULES)}, "
                             f"got {self.intermediate_rule!r}")
        if self.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"aux_loss_scope must be one of {AUX_LOSS_SCOPES}, got {self.aux_loss_scope!r}")
        if self.intermediate_size is None:
            self.intermediate_size = INTERMEDIATE_RULES[self.intermediate_rule](self.hidden_size)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads} (or set head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of halves), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in "
                             f"[1, n_routed_experts={self.n_routed_experts}]")

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


# minimind-3's MoE fields sit in the dense preset too, so `--preset minimind3 --use_moe 1` is minimind-3's MoE
_MINIMIND3 = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, qk_norm=True,
                  rms_norm_eps=1e-6, intermediate_rule="minimind3", n_routed_experts=4, n_shared_experts=0,
                  num_experts_per_tok=1, aux_loss_alpha=5e-4, aux_loss_scope="batch")
PRESETS = {
    "small": dict(hidden_size=512, num_hidden_layers=8),
    "base": dict(hidden_size=768, num_hidden_layers=16),
    "moe": dict(hidden_size=640, num_hidden_layers=8, use_moe=True),
    "minimind3": dict(_MINIMIND3),
    "minimind3-moe": dict(_MINIMIND3, use_moe=True),
}
