"""Export a model to a Hugging Face Transformers folder: MiniMind2 as `LlamaForCausalLM`, minimind-3 as
`Qwen3ForCausalLM` and minimind-3-MoE as `Qwen3MoeForCausalLM`.

    python -m minimind.export full_sft --out hf/MiniMind2-Small          # out/full_sft_<hidden>.pth
    python -m minimind.export out/full_sft_512.pth --lora out/lora/lora_medical_512.pth --out hf/medical

MiniMind2's dense model is a Llama and minimind-3's a Qwen3 (a Llama with q/k norm): pre-norm RMSNorm, rotate-half
RoPE, grouped-query attention without biases, SwiGLU MLP, tied embeddings, and the same key names
(`self_attn.q_norm.weight` / `k_norm.weight` for Qwen3). minimind-3-MoE is a Qwen3-MoE: softmax router
(`mlp.gate.weight`), top-k renormalised (norm_topk_prob), experts `mlp.experts.{j}.{gate,up,down}_proj.weight`, no
shared expert. So export is a config plus the tensors, unchanged:

    config.json             the architecture; vocab/hidden/intermediate/layers/heads/kv heads/head_dim, rope_theta,
                            rms_norm_eps, tie_word_embeddings, bos 1 / eos 2 / pad 0; for Qwen3-MoE num_experts,
                            num_experts_per_tok, moe_intermediate_size, norm_topk_prob
    model.safetensors       model.* tensors in --dtype (fp16: the weight file's own); lm_head is tied to
                            model.embed_tokens, so it is not stored twice. MoE experts one module each, the layout
                            of Qwen3-MoE checkpoints on the Hub (what transformers' save_pretrained writes, and vLLM
                            and llama.cpp read); transformers 5 packs them on load as mlp.experts.gate_up_proj
                            (E, 2I, H), gate over up, and mlp.experts.down_proj (E, H, I)
    tokenizer.json, tokenizer_config.json    the tokenizer the model card names (or --tokenizer), with its chat
                            format's template (MiniMind2's ChatML or minimind-3's, minimind.chat_template)
    generation_config.json  eos <|im_end|>, the sampling defaults of minimind.generate

The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, and is what
vLLM, llama.cpp's convert_hf_to_gguf.py and Ollama take. MiniMind2's MoE (a shared expert added unweighted beside
the routed ones) has no Transformers class that computes the same thing, so it is refused rather than exported
approximately; its .pth stays usable by minimind.chat and minimind.serve. The way back is minimind.import_hf.
"""
import argparse
import json
from pathlib import Path

import torch

from minimind.generate import SamplingConfig
from minimind.weights import find_weights, load_model, load_tokenizer_for

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_config(cfg, dtype: torch.dtype) -> dict:
    """config.json for the Transformers class that computes what `cfg`'s model computes; ValueError if none does."""
    if cfg.rope_scaling:
        raise ValueError("a model with rope_scaling (YaRN) set does not export; YaRN is an inference-time option")
    if cfg.use_moe and cfg.n_shared_experts:
        raise ValueError("MiniMind2's MoE has no Transformers equivalent (its shared expert is added unweighted); "
                         "MoE models export as Qwen3MoeForCausalLM, without shared experts")
    if cfg.use_moe and not cfg.qk_norm:
        raise ValueError("MoE models export as Qwen3MoeForCausalLM, which has q/k norm; this model has none "
                         "(qk_norm false)")
    arch, model_type = (("Qwen3MoeForCausalLM", "qwen3_moe") if cfg.use_moe else
                        ("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else ("LlamaForCausalLM", "llama"))
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if model_type == "llama":
        config["mlp_bias"] = False
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_hidden_layers)
    if cfg.use_moe:
        config.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                      moe_intermediate_size=cfg.intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=cfg.aux_loss_alpha,
                      output_router_logits=False)
    return config


def export(weights, out_dir, lora=None, tokenizer=None, dtype="fp16", num_attention_heads=None) -> Path:
    """Write the Hugging Face folder for a weight file (+ optional LoRA adapter, merged). Returns the folder."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise ImportError("export writes safetensors: pip install safetensors (or -e '.[hf]')") from None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = load_model(weights, lora=lora, num_attention_heads=num_attention_heads)
    config = hf_config(model.config, DTYPES[dtype])
    tok = load_tokenizer_for(weights, tokenizer)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but {weights} only {model.config.vocab_size}; "
                         f"pass the tokenizer it was trained with")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # written here, not by safetensors' save_file, which makes the file owner-only (0600) where the other files get
    # the umask's mode: a server running as another user must be able to read the weights too
    (out / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    s = SamplingConfig()
    generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
                  "pad_token_id": model.config.pad_token_id, "do_sample": True, "temperature": s.temperature,
                  "top_p": s.top_p}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok.save(out)  # with its chat format's template (MiniMind2's or minimind-3's)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minimind.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="a weight file, or a stage prefix looked up in --out_dir")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--out_dir", default="out", help="where a stage prefix is looked up (default %(default)s)")
    p.add_argument("--lora", default=None, help="a LoRA adapter file to merge in first")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the one the weights' .json card names, else the bundled one)")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES),
                   help="fp16 (default) keeps MiniMind's fp16 weight files exactly; bf16 rounds them")
    p.add_argument("--num_attention_heads", type=int, default=None,
                   help="only for a weight file without its .json config (then default 8, as in MiniMind2)")
    args = p.parse_args(argv)
    try:
        path = find_weights(args.weights, args.out_dir)
        out = export(path, args.out, args.lora, args.tokenizer, args.dtype, args.num_attention_heads)
    except (FileNotFoundError, ValueError, ImportError) as e:
        p.error(str(e))
    print(f"wrote {out}/ from {path}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
