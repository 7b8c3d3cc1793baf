"""Export to Hugging Face Transformers (minimind.export) and back (minimind.import_hf): the LlamaForCausalLM
(MiniMind2), Qwen3ForCausalLM (minimind-3) and Qwen3MoeForCausalLM (minimind-3-MoE) folders compute what our model
computes, their tokenizer renders the same chat, what cannot be exported exactly is refused, and a folder comes back
as the weight file it was made from."""
import json

import pytest
import torch

from minimind.export import export, main as export_main
from minimind.lora import apply_lora, lora_state_dict
from minimind.tokenizer import load_tokenizer
from minimind.weights import load_model
from tests.test_chat import MINIMIND3, save_fp16, tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


KINDS = {  # model -> (config overrides of tests.test_chat.tiny, the Transformers class it exports as)
    "minimind2": (dict(), "LlamaForCausalLM"),
    "minimind2-sizes": (dict(num_hidden_layers=3, num_key_value_heads=8, intermediate_size=96), "LlamaForCausalLM"),
    "minimind3": (MINIMIND3, "Qwen3ForCausalLM"),
    "minimind3-moe": (dict(MINIMIND3, use_moe=True), "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_computes_what_we_compute(tmp_path, kind):
    overrides, architecture = KINDS[kind]
    path = save_fp16(tiny(**overrides), tmp_path / "full_sft_64.pth")
    folder = export(path, tmp_path / "hf", dtype="fp32")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["tie_word_embeddings"] is True
    ours, theirs = load_model(path), hf_model(folder)
    assert type(theirs).__name__ == architecture
    if overrides.get("use_moe"):  # transformers 5 packs the experts: gate_up_proj (E, 2I, H) gate over up
        mlp, experts = ours.model.layers[1].mlp, theirs.model.layers[1].mlp.experts
        assert torch.equal(experts.gate_up_proj, torch.cat([mlp.w_gate, mlp.w_up], dim=1))
        assert torch.equal(experts.down_proj, mlp.w_down)
    ids = torch.randint(0, 6400, (2, 33))
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    # Same weights, same math in fp32: only summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Greedy decoding with the cache agrees token for token.
    from minimind.generate import generate
    prompt = ids[:1, :9]
    with torch.no_grad():
        hf_ids = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                                 min_new_tokens=12)[:, 9:]
    ours_ids = generate(ours, prompt, max_new_tokens=12, temperature=0.0, eos_token_id=None)
    assert hf_ids.tolist() == ours_ids.tolist()


def test_the_exported_tokenizer_renders_the_same_chat(tmp_path):
    folder = export(save_fp16(tiny(), tmp_path / "w.pth"), tmp_path / "hf")
    ours, theirs = load_tokenizer(), transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, who is Ada?"},
                {"role": "assistant", "content": "A person."}, {"role": "user", "content": "Her city?"}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(messages, add_generation_prompt=True)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs.eos_token_id == 2 and theirs.pad_token_id == 0


def test_dtype_and_lora_merge(tmp_path):
    base = tiny()
    path = save_fp16(base, tmp_path / "full_sft_64.pth")
    adapted = load_model(path)
    apply_lora(adapted, rank=4)
    for name, p in adapted.named_parameters():
        if name.endswith("lora.B.weight"):
            torch.nn.init.normal_(p, std=0.1)
    torch.save(lora_state_dict(adapted), tmp_path / "lora.pth")
    folder = export(path, tmp_path / "hf", lora=tmp_path / "lora.pth", dtype="fp32")
    ids = torch.randint(0, 6400, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(folder)(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
    from safetensors import safe_open
    folder = export(path, tmp_path / "hf16", dtype="bf16")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    stored = torch.load(path)  # the default, fp16, is the weight file's tensors exactly
    with safe_open(str(export(path, tmp_path / "hf_default") / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == stored.keys() - {"lm_head.weight"}
        assert all(torch.equal(f.get_tensor(k), stored[k]) for k in f.keys())


def test_moe_is_refused_and_the_cli_names_problems(tmp_path, capsys):
    save_fp16(tiny(use_moe=True), tmp_path / "full_sft_64_moe.pth")
    with pytest.raises(SystemExit):
        export_main(["full_sft", "--out_dir", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert "MoE" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit):
        export_main(["rlhf", "--out_dir", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert "rlhf" in capsys.readouterr().err
    save_fp16(tiny(), tmp_path / "rlhf_64.pth")
    export_main(["rlhf", "--out_dir", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "hf" / "model.safetensors").is_file()


def test_the_weights_file_is_as_readable_as_the_rest_of_the_folder(tmp_path):
    # safetensors' save_file creates its file owner-only (0600): a server running as another user could read the
    # config and the tokenizer but not the weights. The folder's files all get the usual mode (the umask's).
    folder = export(save_fp16(tiny(), tmp_path / "w.pth"), tmp_path / "hf")
    modes = {f.name: oct(f.stat().st_mode & 0o777) for f in folder.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_a_minimind3_export_carries_the_tokenizer_and_template_the_card_names(tmp_path):
    """A minimind-3 model trained with minimind-3's real tokenizer: the exported folder has that tokenizer and its
    chat template, and transformers renders (and tokenises) a chat with thinking exactly as we do."""
    from tests.reference_files import reference_folder
    from tests.test_chat import write_card
    real = reference_folder("minimind3-tokenizer")
    model = tiny(**MINIMIND3)
    path = save_fp16(model, tmp_path / "full_sft_64.pth")
    write_card(model, path, tokenizer_dir=real)
    theirs = transformers.AutoTokenizer.from_pretrained(export(path, tmp_path / "hf"))
    assert theirs.chat_template == json.loads((real / "tokenizer_config.json").read_text())["chat_template"]
    ours = load_tokenizer(real)
    messages = [{"role": "user", "content": "你好"},
                {"role": "assistant", "content": "Hi.", "reasoning_content": "A greeting."},
                {"role": "user", "content": "Who are you?"}]
    text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(messages, add_generation_prompt=True)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


# ------------------------------------------------------------------------------------------- import (the way back)

@pytest.mark.parametrize("kind", ["minimind2", "minimind3", "minimind3-moe"])
def test_a_transformers_folder_comes_back_as_the_weight_file(tmp_path, kind):
    """Ours -> export -> import_hf gives the same fp16 tensors and config. So does the folder transformers itself
    writes (save_pretrained: experts one module each on disk) and a state dict as transformers 5 holds it (experts
    packed as gate_up_proj / down_proj)."""
    from safetensors.torch import save_file

    from minimind.import_hf import import_hf
    from minimind.weights import read_card
    overrides, architecture = KINDS[kind]
    model = tiny(**overrides)
    path = save_fp16(model, tmp_path / "full_sft_64.pth")
    stored = torch.load(path)
    folder = export(path, tmp_path / "hf")
    theirs = hf_model(folder).half()
    theirs.save_pretrained(tmp_path / "saved")
    load_tokenizer().save(tmp_path / "saved")
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items() if k != "lm_head.weight"},
              str(packed / "model.safetensors"))
    for source in (folder, tmp_path / "saved", packed):
        out = import_hf(source, tmp_path / f"{source.name}.pth", tokenizer=folder)
        back = torch.load(out)
        assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored), source.name
        loaded = load_model(out)
        assert loaded.config == load_model(path).config, source.name
        assert read_card(out)["tokenizer"] == str(folder.resolve())
    ids = torch.randint(0, 6400, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, load_model(path)(ids).logits, rtol=0, atol=0)


def test_import_refuses_what_is_not_of_minimind_make_and_names_why(tmp_path, capsys):
    from minimind.import_hf import config_from_hf, main as import_main
    folder = export(save_fp16(tiny(**MINIMIND3), tmp_path / "w.pth"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for change, why in ((dict(attention_bias=True), "attention_bias True"),
                        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
                        (dict(tie_word_embeddings=False), "tie_word_embeddings False"),
                        (dict(model_type="gpt2"), "model_type 'gpt2'")):
        with pytest.raises(ValueError, match=why):
            config_from_hf({**config, **change})
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SystemExit):
        import_main([str(folder), "--out", str(tmp_path / "back.pth")])
    assert "no tokenizer.json" in capsys.readouterr().err and not (tmp_path / "back.pth").exists()
    with pytest.raises(SystemExit):
        import_main([str(tmp_path), "--out", str(tmp_path / "back.pth")])
    assert "no config.json" in capsys.readouterr().err
