"""Open a trained model from its weight file alone: the shape is read off the state dict.

A MiniMind weight file (`out/full_sft_512.pth`: fp16, MiniMind key names) carries no config, but every shape
except (without q/k norm) the number of query heads shows in it:

    vocab V, hidden H    model.embed_tokens.weight                        (V, H)
    layers               1 + the largest i in model.layers.{i}.*
    q/k norm, head dim   model.layers.0.self_attn.q_norm.weight           (D,): a minimind-3 file
    heads, kv heads      model.layers.0.self_attn.{q,k}_proj.weight       (heads * D, H), (kv_heads * D, H)
    intermediate I       model.layers.0.mlp.gate_proj.weight              (I, H)
    MoE                  model.layers.0.mlp.gate.weight (E, H); mlp.experts.{e}.*, mlp.shared_experts.{s}.*

With q_norm the head dim is its length, so the head counts follow; the file is minimind-3's, which also fixes what
the tensors cannot show: RMSNorm eps 1e-6 and, for MoE, top-1 with the batch-level aux loss (the minimind3 preset's).
Without it (MiniMind2) `num_attention_heads` (8 in every MiniMind2 preset) and the MoE top-k (2) are taken as given
and the head dim is q_proj's rows / heads.

The trainer also writes a model card beside each weight file (`out/full_sft_512.json`, see `model_card`): the full
config (head_dim, qk_norm and the MoE fields included) and the tokenizer the model was trained with (its folder,
None for the bundled one, and its fingerprint). When it is there the config is used (and checked against the
tensors) and `load_tokenizer_for` picks that tokenizer, refusing one that differs: two tokenizers with the same
vocabulary size give garbage, not an error.

    read_state_dict(path) -> dict                    a weight file, or the model inside a resume checkpoint
    config_from_state_dict(sd, num_attention_heads=8, num_experts_per_tok=None) -> MiniMindConfig
    find_weights(name, out_dir="out") -> Path        a path, a file name ("reason_128"), or a stage prefix:
                                                     "full_sft" -> out/full_sft_*.pth
    load_model(path, lora=None, ...) -> MiniMindForCausalLM in eval mode, a LoRA adapter merged in if given
    load_tokenizer_for(path, tokenizer_dir=None) -> Tokenizer   the one the card names (or tokenizer_dir, checked)
"""
import json
from pathlib import Path
from typing import Optional, Union

import torch

from minimind.config import PRESETS, MiniMindConfig
from minimind.lora import attach_lora, remove_lora
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import Tokenizer, load_tokenizer

CARD_FORMAT = "minimind-model-card/1"


def read_state_dict(path) -> dict:
    """The tensors of a weight file (a resume checkpoint's "model" entry also works). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch weight file ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def config_from_state_dict(sd: dict, num_attention_heads: int = 8, num_experts_per_tok: Optional[int] = None,
                           name: str = "state dict") -> MiniMindConfig:
    """The MiniMindConfig whose model has exactly the tensors of `sd` (MiniMind key names; see the module docstring).
    num_attention_heads is used only without q/k norm; num_experts_per_tok None = the generation's (1 or 2)."""
    def need(key):
        if key not in sd:
            raise ValueError(f"{name}: not a MiniMind model (no {key}); a LoRA adapter goes to --lora")
        return sd[key]

    vocab, hidden = need("model.embed_tokens.weight").shape
    q_rows = need("model.layers.0.self_attn.q_proj.weight").shape[0]
    k_rows = need("model.layers.0.self_attn.k_proj.weight").shape[0]
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in sd
    generation = dict(PRESETS["minimind3"]) if qk_norm else {}
    if qk_norm:
        head_dim = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
        num_attention_heads = q_rows // head_dim
    else:
        head_dim = q_rows // num_attention_heads
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    use_moe = "model.layers.0.mlp.gate.weight" in sd
    if use_moe:
        experts = {int(k.split(".")[5]) for k in sd if k.startswith("model.layers.0.mlp.experts.")}
        shared = {int(k.split(".")[5]) for k in sd if k.startswith("model.layers.0.mlp.shared_experts.")}
        top_k = num_experts_per_tok or generation.get("num_experts_per_tok", 2)
        generation.update(n_routed_experts=len(experts), n_shared_experts=len(shared),
                          num_experts_per_tok=min(top_k, len(experts)))
        inter = need("model.layers.0.mlp.experts.0.gate_proj.weight").shape[0]
    else:
        inter = need("model.layers.0.mlp.gate_proj.weight").shape[0]
    generation.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=num_attention_heads,
                      num_key_value_heads=k_rows // head_dim, head_dim=head_dim, qk_norm=qk_norm, vocab_size=vocab,
                      intermediate_size=inter, use_moe=use_moe)
    return MiniMindConfig(**generation)


def config_path(weights_path) -> Path:
    """Where the model card of a weight file lives: beside it, same stem, .json."""
    return Path(weights_path).with_suffix(".json")


def model_card(config: MiniMindConfig, tokenizer: Tokenizer, tokenizer_dir=None) -> dict:
    """What the trainer writes to config_path(weights): the config and the tokenizer (folder or None = bundled)."""
    return {"format": CARD_FORMAT, "config": config.to_dict(),
            "tokenizer": None if tokenizer_dir is None else str(Path(tokenizer_dir).resolve()),
            "tokenizer_fingerprint": tokenizer.fingerprint}


def read_card(path) -> Optional[dict]:
    """The model card beside the weight file at `path`, or None when there is none."""
    side = config_path(path)
    if not side.is_file():
        return None
    try:
        card = json.loads(side.read_text())
        if card.get("format") != CARD_FORMAT:
            raise ValueError(f"format {card.get('format')!r}, expected {CARD_FORMAT!r}")
        card["config"] = MiniMindConfig.from_dict(card["config"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{side}: not a model card ({type(e).__name__}: {e})") from None
    return card


def model_config(sd: dict, path, num_attention_heads: Optional[int] = None) -> MiniMindConfig:
    """The config of the weight file at `path` with tensors `sd`: its card's when there (checked against the
    tensors), else read off the tensors."""
    card = read_card(path)
    if card is None:
        return config_from_state_dict(sd, num_attention_heads or 8, name=str(path))
    config, side = card["config"], config_path(path)
    if num_attention_heads and num_attention_heads != config.num_attention_heads:
        raise ValueError(f"--num_attention_heads {num_attention_heads} contradicts {side} "
                         f"({config.num_attention_heads})")
    seen = config_from_state_dict(sd, config.num_attention_heads, config.num_experts_per_tok, name=str(path))
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "qk_norm",
            "vocab_size", "intermediate_size", "use_moe")
    wrong = [f"{k} {getattr(config, k)} vs {getattr(seen, k)}" for k in keys if getattr(config, k) != getattr(seen, k)]
    if wrong:
        raise ValueError(f"{side} does not describe {path}: " + ", ".join(wrong))
    return config


def load_tokenizer_for(path, tokenizer_dir=None) -> Tokenizer:
    """The tokenizer for the weight file at `path`: tokenizer_dir if given, else the one its card names (else the
    bundled one). A tokenizer other than the one the card recorded is an error naming both."""
    card = read_card(path)
    recorded = None if card is None else card.get("tokenizer")
    chosen = tokenizer_dir if tokenizer_dir is not None else recorded
    if chosen is not None and not Path(chosen).is_dir():
        raise FileNotFoundError(f"tokenizer folder {chosen} not found" + (
            f" ({config_path(path)} records it; pass --tokenizer DIR)" if tokenizer_dir is None else ""))
    tokenizer = load_tokenizer(chosen)
    if card is not None and card.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise ValueError(f"{path} was trained with the tokenizer {recorded or 'bundled with minimind'}, not "
                         f"{chosen or 'the bundled one'} (fingerprints differ); pass --tokenizer with the right folder")
    return tokenizer


def find_weights(name: Union[str, Path], out_dir="out") -> Path:
    """A path as given, a file name without .pth in out_dir ("reason_128"), or a stage prefix ("pretrain",
    "full_sft", "rlhf", "reason", ...) resolved to the single {out_dir}/{prefix}_{hidden}[_moe].pth there is;
    several sizes need a path or the file name."""
    path = Path(name)
    if path.suffix in (".pth", ".pt") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weight file")
        return path
    if (Path(out_dir) / f"{name}.pth").is_file():
        return Path(out_dir) / f"{name}.pth"
    found = sorted(p for p in Path(out_dir).glob(f"{name}_*.pth")
                   if p.stem[len(str(name)) + 1:].removesuffix("_moe").isdigit())
    if not found:
        raise FileNotFoundError(f"no {out_dir}/{name}_<hidden>.pth or {out_dir}/{name}.pth: train that stage first, "
                                f"or pass a file path")
    if len(found) > 1:
        raise ValueError(f"{name!r} matches {[str(p) for p in found]}; pass one of them (its path, or its name without "
                         f".pth)")
    return found[0]


def load_model(path, lora: Optional[Union[str, Path]] = None, kernels: str = "torch", device="cpu",
               dtype: Optional[torch.dtype] = None, num_attention_heads: Optional[int] = None) -> MiniMindForCausalLM:
    """Build the model a weight file describes and load it strictly; merge a LoRA adapter file into it when given.
    dtype: the parameters' dtype (default fp32 on CPU, bf16 on CUDA). Returns the model in eval mode."""
    sd = read_state_dict(path)
    config = model_config(sd, path, num_attention_heads)
    model = MiniMindForCausalLM(config, kernels=kernels)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the model read off it: {e}") from None
    if lora is not None:
        adapter = read_state_dict(lora)
        try:
            attach_lora(model, adapter)
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{lora}: not a LoRA adapter for {path} ({e})") from None
        remove_lora(model, merge=True)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval()
