"""The tokenizer: bundled folder, MiniMind2 chat template equivalence, loss masks, and the training command."""
import json
import re

import pytest

from minimind.chat_template import MINIMIND2_TEMPLATE as CHAT_TEMPLATE
from minimind.data import DataError
from minimind.tokenizer import BUNDLED_TOKENIZER, load_tokenizer
from tests.reference_files import reference_folder
from tests.train_helpers import minimind2_loss_mask

CONVERSATIONS = [
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
    [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "2 + 3?"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": " Once upon a time...\n"},
     {"role": "user", "content": "再来一个"}, {"role": "assistant", "content": "\n\n好的：从前有座山。"},
     {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "<think>\nok\n</think>\n<answer>\n:)\n</answer>"}],
    [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "end with a user turn"}],
]


@pytest.fixture(scope="module")
def bundled():
    return load_tokenizer()


@pytest.fixture(scope="module")
def real_dir():
    """MiniMind2's own tokenizer folder (../shared/reference/; required under CI=true)."""
    return reference_folder("minimind-tokenizer")


@pytest.fixture(scope="module")
def real(real_dir):
    return load_tokenizer(real_dir)


def test_a_missing_reference_folder_fails_under_ci(monkeypatch, tmp_path):
    """From a clone without ../shared/reference/ the tests that need it skip; CI has it, so there they fail."""
    from tests import reference_files
    monkeypatch.setattr(reference_files, "reference_roots", lambda: [tmp_path])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="minimind-tokenizer not found"):
        reference_folder("minimind-tokenizer")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="minimind-tokenizer not found"):
        reference_folder("minimind-tokenizer")
    (tmp_path / "minimind-tokenizer").mkdir()
    assert reference_folder("minimind-tokenizer") == tmp_path / "minimind-tokenizer"


def test_bundled_tokenizer(bundled):
    assert (bundled.pad_id, bundled.bos_id, bundled.eos_id) == (0, 1, 2)
    assert [bundled.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert bundled.vocab_size <= 6400  # fits the MiniMind2 embedding
    for text in ["Hello world", "你好，世界！", "emoji 🙂 and tabs\t\n", "Oskadra 红色 3 + 4 = 7"]:
        ids = bundled.encode(text)
        assert bundled.encode(text) == ids and bundled.decode(ids) == text
        assert max(ids) < bundled.vocab_size
    assert bundled.decode([1, *bundled.encode("hi"), 2], skip_special_tokens=True) == "hi"
    assert bundled.decode([1, *bundled.encode("hi"), 2]) == "<|im_start|>hi<|im_end|>"


def render_with_jinja(messages, template):
    jinja2 = pytest.importorskip("jinja2")
    return jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=False)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=["plain", "system", "multi-turn", "ends-with-user"])
def test_chat_template_matches_minimind_jinja(real, real_dir, conv):
    template = json.loads((real_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert template == CHAT_TEMPLATE
    text = render_with_jinja(conv, template)
    assert real.apply_chat_template(conv) == text
    ids, mask = real.encode_chat(conv)
    assert ids == real.hf.encode(text, add_special_tokens=False).ids
    assert len(mask) == len(ids)


def test_chat_ids_match_transformers(real, real_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(real_dir))
    for conv in CONVERSATIONS:
        want = hf.apply_chat_template(conv, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert real.encode_chat(conv)[0] == list(want)


def test_loss_mask_is_minimind2s(real):
    for conv in CONVERSATIONS[:2] + CONVERSATIONS[3:]:
        ids, mask = real.encode_chat(conv)
        assert mask == minimind2_loss_mask(ids, real)


@pytest.mark.parametrize("which", ["bundled", "real"])
def test_mask_covers_assistant_content_and_im_end_newline(which, bundled, request):
    tok = bundled if which == "bundled" else request.getfixturevalue("real")
    conv = CONVERSATIONS[2]
    ids, mask = tok.encode_chat(conv)
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    got = [tok.decode(s) for s in spans]
    # a token merging the template's newline with a leading newline of the content starts before the content
    for g, a in zip(got, answers):
        assert g.endswith("<|im_end|>\n") and a.endswith(g[:-len("<|im_end|>\n")])
        assert len(a) - len(g[:-len("<|im_end|>\n")]) <= 1
    assert len(got) == len(answers)


def test_transformers_loads_the_bundled_folder(bundled):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    text = "Question: What is 3 plus 4?\nAnswer: 7 问：林安住在哪座城市？"
    assert hf.encode(text, add_special_tokens=False) == bundled.encode(text)
    for conv in CONVERSATIONS:
        want = hf.apply_chat_template(conv, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert list(want) == bundled.encode_chat(conv)[0]


def test_train_tokenizer_command(tmp_path, monkeypatch):
    from train import tokenizer as cli

    data = tmp_path / "d.jsonl"
    lines = [{"text": f"the quick brown fox {i} jumps over 懒狗 {i % 7}"} for i in range(200)]
    lines += [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "tok"
    monkeypatch.setattr("sys.argv", ["x", "--data", str(data), "--vocab_size", "300", "--out", str(out)])
    cli.main()
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300 and [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == CHAT_TEMPLATE and cfg["bos_token"] == "<|im_start|>"
    assert tok.decode(tok.encode("the quick brown 懒狗")) == "the quick brown 懒狗"
    data.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        cli.main()


def test_wrong_special_ids_are_refused(tmp_path):
    from tokenizers import Tokenizer, models

    from minimind.tokenizer import Tokenizer as Ours
    hf = Tokenizer(models.BPE())
    hf.add_special_tokens(["<|im_start|>", "<|endoftext|>", "<|im_end|>"])
    with pytest.raises(ValueError, match=re.escape("<|endoftext|> must have id 0")):
        Ours(hf)
