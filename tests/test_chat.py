"""Opening a trained model from its weight file alone (minimind.weights) and the terminal chat (minimind.chat)."""
import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from minimind import MiniMindConfig, MiniMindForCausalLM
from minimind.config import PRESETS
from minimind.chat import main as chat_main
from minimind.generate import chat, stream_text
from minimind.lora import apply_lora, lora_state_dict
from minimind.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from minimind.weights import config_from_state_dict, find_weights, load_model, read_state_dict


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = MiniMindConfig(**{**dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2), **overrides})
    model = MiniMindForCausalLM(cfg).eval()
    for p in model.parameters():  # larger than the default init: peaked next-token distributions
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.15)
    return model


# minimind-3's structure at toy size: q/k norm, 8 q / 4 kv heads of 24 (not hidden / heads), top-1 MoE, no shared
MINIMIND3 = dict(PRESETS["minimind3"], hidden_size=64, num_hidden_layers=2, head_dim=24)


def save_fp16(model, path):
    """What the trainer writes: an fp16 state dict with MiniMind2's keys."""
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("overrides", [dict(), dict(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96),
                                       dict(use_moe=True, n_routed_experts=3, n_shared_experts=1), MINIMIND3,
                                       dict(MINIMIND3, use_moe=True, num_key_value_heads=2, n_routed_experts=3)],
                         ids=["minimind2", "minimind2-sizes", "minimind2-moe", "minimind3", "minimind3-moe"])
def test_config_is_read_off_the_state_dict(overrides):
    cfg = tiny(**overrides).config
    got = config_from_state_dict(tiny(**overrides).state_dict())
    if cfg.qk_norm:  # q_norm gives the head dim, so the heads; and a minimind-3 file is minimind-3's in the rest
        assert got == cfg
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "vocab_size", "intermediate_size", "use_moe", "n_routed_experts", "n_shared_experts"):
        if field.startswith("n_") and not cfg.use_moe:
            continue
        assert getattr(got, field) == getattr(cfg, field), field


@pytest.mark.parametrize("overrides", [dict(), dict(use_moe=True), MINIMIND3, dict(MINIMIND3, use_moe=True)],
                         ids=["dense", "moe", "minimind3", "minimind3-moe"])
def test_load_model_gives_the_saved_model(tmp_path, overrides):
    model = tiny(**overrides)
    path = save_fp16(model, tmp_path / "full_sft_64.pth")
    rounded = tiny(**overrides)
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    loaded = load_model(path)
    assert not loaded.training and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 6400, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, rounded(ids).logits, rtol=0, atol=0)


def test_load_model_merges_a_lora_adapter(tmp_path):
    base = tiny()
    path = save_fp16(base, tmp_path / "full_sft_64.pth")
    adapted = tiny()
    adapted.load_state_dict({k: v.half().float() for k, v in base.state_dict().items()})
    apply_lora(adapted, rank=4, generator=torch.Generator().manual_seed(1))
    for name, p in adapted.named_parameters():
        if name.endswith("lora.B.weight"):
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; give the adapter something to do
    torch.save(lora_state_dict(adapted), tmp_path / "lora.pth")
    merged = load_model(path, lora=tmp_path / "lora.pth")
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.randint(0, 6400, (2, 9))
    with torch.no_grad():
        want, got = adapted(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - tiny()(ids).logits).abs().max() > 1e-2  # the adapter did change the model


def test_weight_files_are_found_by_prefix_and_bad_ones_named(tmp_path):
    path = save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    assert find_weights("full_sft", tmp_path) == path
    assert find_weights(str(path)) == path
    with pytest.raises(FileNotFoundError, match="rlhf"):
        find_weights("rlhf", tmp_path)
    save_fp16(tiny(), tmp_path / "full_sft_128.pth")
    with pytest.raises(ValueError, match="full_sft_128.pth"):
        find_weights("full_sft", tmp_path)
    assert find_weights("full_sft_128", tmp_path) == tmp_path / "full_sft_128.pth"  # the file name picks one
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"model": tiny().state_dict(), "step": 3}, tmp_path / "resume.pt")  # a resume checkpoint
    assert config_from_state_dict(read_state_dict(tmp_path / "resume.pt")).hidden_size == 64
    adapted = tiny()
    apply_lora(adapted, rank=2)
    torch.save(lora_state_dict(adapted), tmp_path / "adapter.pth")
    with pytest.raises(ValueError, match="--lora"):
        load_model(tmp_path / "adapter.pth")


def test_stream_text_reports_why_it_stopped():
    model, tok = tiny(), load_tokenizer()
    prompt = tok.encode("<|im_start|>hello")
    info = {}
    text = "".join(stream_text(model, tok, prompt, max_new_tokens=6, temperature=0.0, info=info))
    assert info == dict(prompt_tokens=len(prompt), completion_tokens=6, finish_reason="length")
    greedy = [tok.encode(text)]
    # Declare the third greedy token the end of the reply: generation stops there, and says so.
    from minimind.generate import generate
    ids = generate(model, torch.tensor([prompt]), max_new_tokens=3, temperature=0.0, eos_token_id=None)[0].tolist()
    info = {}
    text = "".join(stream_text(model, tok, prompt, max_new_tokens=6, temperature=0.0, info=info,
                               eos_token_id=ids[2]))
    if ids[2] not in ids[:2]:
        assert info["finish_reason"] == "stop" and info["completion_tokens"] == 2
        assert text == tok.decode(ids[:2], skip_special_tokens=True)
    assert greedy


def run_chat(argv, stdin=""):
    out = io.StringIO()
    import sys
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out):
            chat_main(argv)
    finally:
        sys.stdin = old
    return out.getvalue()


def test_chat_cli_answers_like_the_library(tmp_path):
    path = save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    model, tok = load_model(path), load_tokenizer()
    flags = ["--out_dir", str(tmp_path), "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu"]
    u1, u2 = "Who is Ada?", "And her city?"
    a1 = chat(model, tok, [{"role": "user", "content": u1}], max_new_tokens=8, temperature=0.0)
    assert run_chat(["full_sft", *flags, "--prompt", u1]) == a1 + "\n"
    # Piped input, two turns, the first one kept as context for the second.
    a2 = chat(model, tok, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                           {"role": "user", "content": u2}], max_new_tokens=8, temperature=0.0)
    assert run_chat(["full_sft", *flags, "--history", "1"], stdin=f"{u1}\n{u2}\n") == f"{a1}\n{a2}\n"
    # Without history the second question stands alone.
    alone = chat(model, tok, [{"role": "user", "content": u2}], max_new_tokens=8, temperature=0.0)
    assert run_chat(["full_sft", *flags], stdin=f"{u1}\n{u2}\n") == f"{a1}\n{alone}\n"
    # Text mode continues <|im_start|> + the prompt, as pretraining data reads.
    text = "".join(stream_text(model, tok, [tok.bos_id] + tok.encode("Ada lives in"), max_new_tokens=8,
                               temperature=0.0))
    assert run_chat(["full_sft", *flags, "--mode", "text", "--prompt", "Ada lives in"]) == text + "\n"


def test_chat_cli_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        chat_main(["pretrain", "--out_dir", str(tmp_path), "--prompt", "hi"])
    assert e.value.code == 2 and "pretrain" in capsys.readouterr().err


def write_card(model, path, tokenizer_dir=None, **config_changes):
    from minimind.weights import config_path, model_card
    card = model_card(model.config, load_tokenizer(tokenizer_dir), tokenizer_dir)
    card["config"].update(config_changes)
    config_path(path).write_text(json.dumps(card))


def test_the_card_beside_a_weight_file_is_used_and_checked(tmp_path):
    model = tiny(num_attention_heads=4)  # not visible in the tensors: only the card can say it
    path = save_fp16(model, tmp_path / "full_sft_64.pth")
    write_card(model, path)
    loaded = load_model(path)
    assert loaded.config.num_attention_heads == 4
    ids = torch.randint(0, 6400, (1, 8))
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="contradicts"):
        load_model(path, num_attention_heads=8)
    write_card(model, path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_hidden_layers 3 vs 2"):
        load_model(path)
    (tmp_path / "full_sft_64.json").write_text('{"hidden_size": 64}')
    with pytest.raises(ValueError, match="full_sft_64.json: not a model card"):
        load_model(path)


def test_the_card_picks_the_tokenizer_and_refuses_another(tmp_path):
    from minimind.weights import load_tokenizer_for
    bundled = load_tokenizer()
    mine = tmp_path / "my_tokenizer"
    bundled.save(mine)
    spec = json.loads((mine / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, other ids: exactly the silent-garbage case
    (mine / "tokenizer.json").write_text(json.dumps(spec))
    model = tiny()
    path = save_fp16(model, tmp_path / "full_sft_64.pth")
    write_card(model, path, tokenizer_dir=mine)
    assert load_tokenizer_for(path).fingerprint == load_tokenizer(mine).fingerprint != bundled.fingerprint
    with pytest.raises(ValueError, match="fingerprints differ"):
        load_tokenizer_for(path, BUNDLED_TOKENIZER)
    out = run_chat([str(path), "--prompt", "hi", "--temperature", "0", "--max_new_tokens", "4"])
    assert out == chat(load_model(path), load_tokenizer(mine), [{"role": "user", "content": "hi"}],
                       max_new_tokens=4, temperature=0.0) + "\n"
    write_card(model, path, tokenizer_dir=mine)
    import shutil
    shutil.rmtree(mine)
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        load_tokenizer_for(path)


def test_a_state_dict_without_layers_is_named():
    with pytest.raises(ValueError, match="weights.pth: not a MiniMind model"):
        config_from_state_dict({"model.embed_tokens.weight": torch.zeros(10, 8)}, name="weights.pth")


def test_chat_on_the_triton_kernels_answers_like_torch(tmp_path):
    path = save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    flags = ["--prompt", "Who is Ada?", "--temperature", "0", "--max_new_tokens", "5", "--device", "cpu"]
    assert run_chat([str(path), *flags, "--kernels", "triton"]) == run_chat([str(path), *flags])


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tmp_path, monkeypatch):
    import minimind.chat as chat_module
    path = save_fp16(tiny(), tmp_path / "full_sft_64.pth")
    real, seen = chat_module.stream_text, []

    def interrupted_once(model, tokenizer, prompt_ids, *args, **kwargs):
        seen.append(tokenizer.decode(prompt_ids))
        if len(seen) == 1:
            yield "half a rep"
            raise KeyboardInterrupt
        yield from real(model, tokenizer, prompt_ids, *args, **kwargs)
    monkeypatch.setattr(chat_module, "stream_text", interrupted_once)
    out = run_chat([str(path), "--history", "2", "--temperature", "0", "--max_new_tokens", "4"], stdin="first\nsecond\n")
    assert out.startswith("half a rep [stopped]\n")
    assert "second" in seen[1] and "first" not in seen[1]  # the stopped exchange is not in the history
