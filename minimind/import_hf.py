"""Import a Hugging Face Transformers folder as a MiniMind weight file: the way back from minimind.export.

    python -m minimind.import_hf hf/minimind-3 --out out/full_sft_768.pth
    python -m minimind.import_hf hf/MiniMind2-Small --out out/full_sft_512.pth --tokenizer path/to/tokenizer

    LlamaForCausalLM     -> MiniMind2 (dense)
    Qwen3ForCausalLM     -> minimind-3 (q/k norm)
    Qwen3MoeForCausalLM  -> minimind-3-MoE (every layer MoE, softmax router, top-k, no shared expert)

of MiniMind's make: tied embeddings, SiLU, no biases, plain RoPE (no rope scaling), no sliding window. Anything else
is refused with the config field that does not fit. The config comes from config.json (head_dim, rms_norm_eps,
rope_theta, num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob, router_aux_loss_coef); what it
cannot say is minimind-3's (the minimind3 preset: the batch-level aux loss, the pi MLP rule).

Tensors: model.safetensors (or shards listed in model.safetensors.index.json, or pytorch_model.bin). Their names are
already MiniMind's; MoE experts come one module each (the Hub layout, what save_pretrained writes) or packed as
transformers 5 holds them, mlp.experts.gate_up_proj (E, 2I, H) gate over up and mlp.experts.down_proj (E, H, I),
which are split into MiniMind's `mlp.experts.{j}.{gate,up,down}_proj.weight`.

Writes the weight file (fp16 by default, as the trainer does; atomically) and its model card beside it, naming the
tokenizer: --tokenizer, else the folder itself (it must hold a tokenizer.json with MiniMind's special tokens).
"""
import argparse
import json
from pathlib import Path

import torch

from minimind.config import PRESETS, MiniMindConfig
from minimind.export import DTYPES
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer
from minimind.weights import config_path, model_card

ARCHITECTURES = {"llama": "MiniMind2", "qwen3": "minimind-3", "qwen3_moe": "minimind-3-MoE"}


def config_from_hf(hf: dict, where="config.json") -> MiniMindConfig:
    """The MiniMindConfig of a Transformers config.json (a dict); ValueError naming the field that does not fit."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type {kind!r} is not one of {sorted(ARCHITECTURES)} "
                         f"(LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)")
    rope = hf.get("rope_parameters") or {}
    rope_kind = hf.get("rope_scaling") or rope.get("rope_type", "default")
    unfit = {"hidden_act": (hf.get("hidden_act", "silu"), hf.get("hidden_act", "silu") != "silu"),
             "attention_bias": (hf.get("attention_bias"), bool(hf.get("attention_bias"))),
             "mlp_bias": (hf.get("mlp_bias"), bool(hf.get("mlp_bias"))),
             "tie_word_embeddings": (hf.get("tie_word_embeddings"), not hf.get("tie_word_embeddings", True)),
             "rope scaling": (rope_kind, rope_kind != "default"),
             "use_sliding_window": (hf.get("use_sliding_window"), bool(hf.get("use_sliding_window"))),
             "decoder_sparse_step": (hf.get("decoder_sparse_step"), hf.get("decoder_sparse_step", 1) != 1),
             "mlp_only_layers": (hf.get("mlp_only_layers"), bool(hf.get("mlp_only_layers"))),
             "shared_expert_intermediate_size": (hf.get("shared_expert_intermediate_size"),
                                                 bool(hf.get("shared_expert_intermediate_size")))}
    wrong = [f"{k} {value!r}" for k, (value, bad) in unfit.items() if bad]
    if wrong:
        raise ValueError(f"{where}: not of MiniMind's make ({', '.join(wrong)}); import takes tied embeddings, SiLU, "
                         f"no biases, plain RoPE, no sliding window, every layer MoE")
    fields = dict(PRESETS["minimind3"]) if kind.startswith("qwen3") else {}
    heads = hf["num_attention_heads"]
    fields.update(hidden_size=hf["hidden_size"], num_hidden_layers=hf["num_hidden_layers"],
                  num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads", heads),
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, qk_norm=kind.startswith("qwen3"),
                  vocab_size=hf["vocab_size"], intermediate_size=hf["intermediate_size"],
                  rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
                  rms_norm_eps=hf.get("rms_norm_eps", 1e-6), use_moe=kind == "qwen3_moe")
    if "max_position_embeddings" in hf:
        fields["max_position_embeddings"] = hf["max_position_embeddings"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(hf.get(name), int):
            fields[name] = hf[name]
    if kind == "qwen3_moe":
        fields.update(n_routed_experts=hf.get("num_experts", hf.get("num_local_experts")), n_shared_experts=0,
                      num_experts_per_tok=hf["num_experts_per_tok"], intermediate_size=hf["moe_intermediate_size"],
                      norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        if "router_aux_loss_coef" in hf:
            fields["aux_loss_alpha"] = hf["router_aux_loss_coef"]
    try:
        return MiniMindConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def read_hf_tensors(folder) -> dict:
    """Every tensor of a Transformers folder, by name."""
    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    from safetensors.torch import load_file
    tensors = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def minimind_state_dict(tensors: dict, where="folder") -> dict:
    """MiniMind's keys for a Llama / Qwen3 / Qwen3-MoE state dict: packed experts split, the tied lm_head and RoPE
    buffers dropped (an lm_head that differs from the embedding is refused: MiniMind ties them)."""
    sd = {}
    for key, t in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H): gate rows, then up rows
            prefix, inter = key.removesuffix("gate_up_proj"), t.shape[1] // 2
            for j in range(t.shape[0]):
                sd[f"{prefix}{j}.gate_proj.weight"], sd[f"{prefix}{j}.up_proj.weight"] = t[j, :inter], t[j, inter:]
        elif key.endswith("mlp.experts.down_proj"):  # (E, H, I)
            for j in range(t.shape[0]):
                sd[f"{key.removesuffix('down_proj')}{j}.down_proj.weight"] = t[j]
        else:
            sd[key] = t
    head, embed = sd.pop("lm_head.weight", None), sd.get("model.embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ValueError(f"{where}: lm_head.weight differs from model.embed_tokens.weight; MiniMind ties them")
    return sd


def import_hf(folder, out, tokenizer=None, dtype="fp16") -> Path:
    """Write the MiniMind weight file `out` (and its model card) for the Transformers folder. Returns its path."""
    from train.checkpoint import atomic_save, atomic_write_text  # the trainer's atomic writes
    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a Transformers folder)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    hf = json.loads((folder / "config.json").read_text())
    config = config_from_hf(hf, where=str(folder / "config.json"))
    tok_dir = Path(tokenizer) if tokenizer is not None else folder
    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{tok_dir}: no tokenizer.json; pass --tokenizer with the model's tokenizer folder")
    tok = load_tokenizer(tok_dir)
    if len(tok) > config.vocab_size:
        raise ValueError(f"the tokenizer in {tok_dir} has {len(tok)} tokens, the model only {config.vocab_size}")
    model = MiniMindForCausalLM(config)
    sd = minimind_state_dict(read_hf_tensors(folder), where=str(folder))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder}: its tensors do not fit the {ARCHITECTURES[hf['model_type']]} model its "
                         f"config.json describes: {e}") from None
    atomic_save({k: v.to(DTYPES[dtype]) for k, v in model.state_dict().items()}, out)
    card = model_card(config, tok, tok_dir)
    atomic_write_text(json.dumps(card, indent=1) + "\n", config_path(out))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimind.import_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a Transformers folder (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, help="the weight file to write, e.g. out/full_sft_768.pth")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the Transformers folder itself)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="fp16 (default): as the trainer writes")
    args = p.parse_args(argv)
    try:
        out = import_hf(args.folder, args.out, args.tokenizer, args.dtype)
    except (FileNotFoundError, ValueError, ImportError) as e:
        p.error(str(e))
    print(f"wrote {out} and {config_path(out)} from {args.folder}: open it with minimind.chat or any stage's "
          f"--from_weight")


if __name__ == "__main__":
    main()
