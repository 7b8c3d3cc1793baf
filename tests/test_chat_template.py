"""minimind-3's chat format: our renderer against transformers' apply_chat_template on the real tokenizer folder,
the loss mask, format detection, saving, training a minimind-3-style tokenizer, and reading a generated reply."""
import copy
import json
import re

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from minimind.chat_template import (EMPTY_THINK, MINIMIND3_TEMPLATE, ReplyReader, detect_format, parse_reply,
                                    parse_tool_calls, read_events, split_thinking)
from minimind.tokenizer import Tokenizer, load_tokenizer
from tests.reference_files import reference_folder

TOOLS = [
    {"type": "function", "function": {"name": "calculate_math", "description": "计算数学表达式",
                                      "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                     "required": ["expression"]}}},
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
]
USER = {"role": "user", "content": "帮我算一下 256 乘以 37 等于多少"}
CALL_OBJ = {"name": "calculate_math", "arguments": {"expression": "256 * 37"}}
CALL_STR = {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}}

# (id, messages, tools)
CASES = [
    ("no-system", [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}], None),
    ("system", [{"role": "system", "content": "You are MiniMind."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5"}], None),
    ("tools-with-system", [{"role": "system", "content": "你是一个助手。"}, USER,
                           {"role": "assistant", "content": "9472"}], TOOLS),
    ("tools-without-system", [USER, {"role": "assistant", "content": "9472"}], TOOLS),
    ("reasoning-content", [USER, {"role": "assistant", "content": "等于 9472。",
                                  "reasoning_content": "\n256 * 37 = 256 * 40 - 256 * 3 = 10240 - 768\n"}], None),
    ("think-prefix", [USER, {"role": "assistant", "content": "<think>\n先算 256*37。\n</think>\n\n\n等于 9472。"}], None),
    ("think-prefix-no-open-tag", [USER, {"role": "assistant", "content": "想一想\n</think>答案"}], None),
    ("empty-reasoning-beats-prefix", [USER, {"role": "assistant", "content": "<think>x</think>y",
                                             "reasoning_content": ""}], None),
    ("one-call-object-args", [USER, {"role": "assistant", "content": "", "tool_calls": [CALL_OBJ]},
                              {"role": "tool", "content": "{\"result\": \"9472\"}"},
                              {"role": "assistant", "content": "256 乘以 37 等于 9472。"}], TOOLS),
    ("one-call-string-args", [USER, {"role": "assistant", "content": None, "tool_calls": [CALL_STR]},
                              {"role": "tool", "content": "晴，25°C"}, {"role": "assistant", "content": "北京晴。"}],
     TOOLS),
    ("several-calls-and-tools", [USER, {"role": "assistant", "content": "我来查一下。", "tool_calls": [CALL_OBJ, CALL_STR]},
                                 {"role": "tool", "content": "{\"result\": \"9472\"}"},
                                 {"role": "tool", "content": "{\"weather\": \"晴\"}"},
                                 {"role": "assistant", "content": "9472；北京晴。"}], TOOLS),
    ("calls-with-reasoning", [USER, {"role": "assistant", "content": "", "reasoning_content": "需要计算器",
                                     "tool_calls": [CALL_OBJ]}, {"role": "tool", "content": "9472"}], TOOLS),
    ("several-turns", [{"role": "system", "content": "简短回答"},
                       {"role": "user", "content": "Tell me a story."},
                       {"role": "assistant", "content": " Once upon a time...\n"},
                       {"role": "user", "content": "再来一个"},
                       {"role": "assistant", "content": "\n\n好的：从前有座山。", "reasoning_content": "讲故事"},
                       {"role": "user", "content": "thanks"}, {"role": "assistant", "content": ":)"}], None),
    ("late-system", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "system", "content": "be brief"}, {"role": "user", "content": "bye"},
                     {"role": "assistant", "content": "bye"}], None),
    ("ends-with-user", [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "end with a user turn"}],
     None),
    ("ends-with-tool", [USER, {"role": "assistant", "content": "", "tool_calls": [CALL_OBJ]},
                        {"role": "tool", "content": "9472"}], TOOLS),
    ("answer-starts-with-spaces", [USER, {"role": "assistant", "content": "   indented\n\tcode"}], None),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def folder():
    return reference_folder("minimind3-tokenizer")


@pytest.fixture(scope="module")
def real(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_ids(hf, messages, tools=None, **kw):
    out = hf.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_real_folder_is_minimind3(folder, real):
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == MINIMIND3_TEMPLATE
    assert real.chat_format == "minimind3" and real.supports_thinking and real.supports_tools
    assert (real.pad_id, real.bos_id, real.eos_id) == (0, 1, 2)
    assert [real.token_to_id(t) for t in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                          "<think>", "</think>", "<|buffer9|>")] == [21, 22, 23, 24, 25, 26, 35]
    # the Jinja's thinking switch is `open_thinking` (not Qwen3's enable_thinking)
    assert "open_thinking" in cfg["chat_template"] and "enable_thinking" not in cfg["chat_template"]


@pytest.mark.parametrize("messages,tools", [c[1:] for c in CASES], ids=IDS)
def test_ids_match_transformers(real, hf, messages, tools):
    want_text = hf.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=False)
    assert real.apply_chat_template(messages, tools=tools) == want_text
    ids, mask = real.encode_chat(messages, tools=tools)
    assert ids == hf_ids(hf, messages, tools)
    assert len(mask) == len(ids)


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("case", ["no-system", "tools-without-system", "ends-with-user", "ends-with-tool"])
def test_generation_prompt_matches_transformers(real, hf, case, thinking):
    _, messages, tools = CASES[IDS.index(case)]
    want = hf_ids(hf, messages, tools, add_generation_prompt=True, open_thinking=thinking)
    for kw in ({"enable_thinking": thinking}, {"open_thinking": thinking}):
        text = real.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kw)
        assert real.encode(text) == want
    assert text.endswith("<|im_start|>assistant\n<think>\n" if thinking else "<|im_start|>assistant\n" + EMPTY_THINK)
    off = real.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert real.encode(off) == hf_ids(hf, messages, tools, add_generation_prompt=True)  # off unless asked
    with pytest.raises(ValueError, match="contradicts"):
        real.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True, open_thinking=False)


def minimind_loss_mask(ids, tok):
    """MiniMind's rule, written independently: after each `<|im_start|>assistant\\n` token run, mark every token up to
    and including the next `<|im_end|>\\n` token run."""
    start, end = tok.encode("<|im_start|>assistant\n"), tok.encode("<|im_end|>\n")
    mask, i = [0] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(start)] == start:
            j = i + len(start)
            k = j
            while k < len(ids) and ids[k:k + len(end)] != end:
                k += 1
            for p in range(j, min(k + len(end), len(ids))):
                mask[p] = 1
            i = k + len(end)
        else:
            i += 1
    return mask


@pytest.mark.parametrize("messages,tools", [c[1:] for c in CASES], ids=IDS)
def test_loss_mask_is_every_assistant_span(real, messages, tools):
    ids, mask = real.encode_chat(messages, tools=tools)
    assert mask == minimind_loss_mask(ids, real)
    spans = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", real.apply_chat_template(messages, tools=tools),
                       re.DOTALL)
    got, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            got.append(real.decode(cur))
            cur = []
    assert got == spans and len(got) == sum(m["role"] == "assistant" for m in messages)


def test_unknown_role_and_unparsed_calls_are_refused(real):
    with pytest.raises(ValueError, match="role 'function'"):
        real.apply_chat_template([USER, {"role": "function", "content": "x"}])
    with pytest.raises(TypeError, match="parse the JSON string first"):
        real.apply_chat_template([USER, {"role": "assistant", "content": "", "tool_calls": "[{}]"}])


def test_minimind2_format_has_no_tools_and_ignores_thinking():
    tok = load_tokenizer()
    assert tok.chat_format == "minimind2" and not tok.supports_thinking and not tok.supports_tools
    conv = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(conv, add_generation_prompt=True, enable_thinking=True) == \
        tok.apply_chat_template(conv)
    with pytest.raises(ValueError, match="no tools"):
        tok.apply_chat_template(conv, tools=TOOLS)


def test_format_detection(tmp_path, folder, real):
    vocab = real.hf.get_vocab(with_added_tokens=True)
    assert detect_format(None, vocab).name == "minimind3"  # no template: told by the tokens
    assert detect_format(None, {"<|im_start|>": 1}).name == "minimind2"
    with pytest.raises(ValueError, match="neither MiniMind2's nor minimind-3's"):
        detect_format("{{ messages }}", vocab, "x/tokenizer_config.json")
    # a folder without tokenizer_config.json
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text((folder / "tokenizer.json").read_text(encoding="utf-8"),
                                                      encoding="utf-8")
    bare = load_tokenizer(tmp_path / "bare")
    assert bare.chat_format == "minimind3" and bare.fingerprint == real.fingerprint
    # the format is part of the fingerprint (caches, model cards), except MiniMind2's (unchanged from before)
    as_m2 = Tokenizer(real.hf, chat_format="minimind2")
    assert as_m2.fingerprint != real.fingerprint
    # pickling keeps the format (cache worker processes)
    import pickle
    assert pickle.loads(pickle.dumps(real)).chat_format == "minimind3"


def test_minimind3_tokens_are_required(tmp_path):
    from tokenizers import Tokenizer as HF, models
    hf = HF(models.BPE())
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(ValueError, match="lacks as added tokens"):
        Tokenizer(hf, chat_format="minimind3")


def test_saved_folder_renders_the_same_in_transformers(real, hf, tmp_path):
    transformers = pytest.importorskip("transformers")
    real.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.chat_format == "minimind3" and again.fingerprint == real.fingerprint
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert saved.convert_tokens_to_ids(["<think>", "<|im_end|>"]) == [25, 2]
    for _, messages, tools in CASES:
        assert hf_ids(saved, messages, tools) == hf_ids(hf, messages, tools)
    # non-special template tokens survive skip_special_tokens (the reply parser needs them)
    ids = real.encode("<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>")
    assert saved.decode(ids, skip_special_tokens=True) == real.decode(ids, skip_special_tokens=True) == \
        "<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"


def test_train_a_minimind3_tokenizer(tmp_path, monkeypatch, folder):
    transformers = pytest.importorskip("transformers")
    from train import tokenizer as cli

    data = tmp_path / "d.jsonl"
    lines = [{"text": f"the quick brown fox {i} jumps over 懒狗 {i % 7}"} for i in range(200)]
    lines += [{"conversations": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello there", "reasoning_content": "greet back"}]}]
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    out = tmp_path / "tok3"
    monkeypatch.setattr("sys.argv", ["x", "--data", str(data), "--vocab_size", "330", "--format", "minimind3",
                                     "--out", str(out)])
    cli.main()
    tok = load_tokenizer(out)
    ref = load_tokenizer(folder)
    assert tok.chat_format == "minimind3" and tok.vocab_size == 330
    assert [tok.id_to_token(i) for i in range(36)] == [ref.id_to_token(i) for i in range(36)]
    special = {i: a.special for i, a in tok.hf.get_added_tokens_decoder().items()}
    assert special == {i: a.special for i, a in ref.hf.get_added_tokens_decoder().items()}
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    ref_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == MINIMIND3_TEMPLATE
    assert {k: v for k, v in cfg.items() if k != "added_tokens_decoder"} == \
        {k: v for k, v in ref_cfg.items() if k != "added_tokens_decoder"}
    assert cfg["added_tokens_decoder"] == ref_cfg["added_tokens_decoder"]
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    for _, messages, tools in CASES:
        assert tok.encode_chat(messages, tools)[0] == hf_ids(hf, messages, tools)
    assert list(cli.iter_texts([data]))[-3:] == ["hi", "hello there", "greet back"]  # reasoning_content is read
    monkeypatch.setattr("sys.argv", ["x", "--data", str(data), "--vocab_size", "291", "--format", "minimind3",
                                     "--out", str(out)])
    with pytest.raises(SystemExit, match=r"\[292, 65536\]"):
        cli.main()


# ---- reading a reply ----

def test_split_thinking():
    assert split_thinking("想一想\n</think>\n\n答案", thinking_open=True) == ("想一想", "答案")
    assert split_thinking("<think>\na\n</think>\n\nb") == ("a", "b")
    assert split_thinking("just an answer") == ("", "just an answer")
    assert split_thinking("cut short while thinking", thinking_open=True) == ("cut short while thinking", "")
    assert split_thinking("<think>\nunfinished") == ("unfinished", "")


def test_parse_tool_calls():
    text = ('我来算。\n<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"北京\\"}"}\n</tool_call>')
    ids = iter(["call_a", "call_b"])
    content, calls, invalid = parse_tool_calls(text, make_id=lambda: next(ids))
    assert content == "我来算。" and invalid == []
    assert calls == [
        {"id": "call_a", "type": "function",
         "function": {"name": "calculate_math", "arguments": '{"expression": "256 * 37"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]
    bad = 'x <tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call> y <tool_call>{"arguments": {}}</tool_call>'
    content, calls, invalid = parse_tool_calls(bad + " <tool_call>{\"name\": \"g\"")
    assert calls == [] and len(invalid) == 3 and content == bad + " <tool_call>{\"name\": \"g\""
    _, calls, _ = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>')
    assert calls[0]["function"] == {"name": "now", "arguments": "{}"} and re.fullmatch(r"call_[0-9a-f]{24}",
                                                                                     calls[0]["id"])


def test_reply_reading_rules():
    # the reasoning ends at the first </think>; newlines around it go; a second </think> is answer text
    assert split_thinking("\n\nr\n\n</think>\n\na</think>b", thinking_open=True) == ("r", "a</think>b")
    # a reply that does not open with <think> (the prompt closed thinking) has none
    assert split_thinking("a</think>b") == ("", "a</think>b")
    assert split_thinking("\n<think>\nr</think>a") == ("r", "a")
    # the newlines on either side of a call leave with it; others stay
    calls = '\n\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g"}</tool_call>\n'
    content, found, _ = parse_tool_calls("a\n" + calls + "\nb\n\n")
    assert content == "ab\n\n" and [c["function"]["name"] for c in found] == ["f", "g"]
    # MiniMind2 (no think tags) and a request without tools read nothing
    text = "<think>\nr\n</think>\n\n" + calls
    assert parse_reply(text, think_tags=False, tool_calls=False).content == text
    assert parse_reply(text, tool_calls=False).content == calls.lstrip("\n")


REPLY_PARTS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "\n", "\n\n", "a", "好", " ", "<", "</",
               '{"name": "f", "arguments": {"x": 1}}', '{"name": "g"}', '{"oops"', "<thi", "</tool_c"]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(parts=st.lists(st.sampled_from(REPLY_PARTS), max_size=14), cuts=st.lists(st.integers(0, 200), max_size=8),
       thinking_open=st.booleans(), think_tags=st.booleans(), tool_calls=st.booleans())
def test_a_streamed_reply_reads_the_same_however_it_is_split(parts, cuts, thinking_open, think_tags, tool_calls):
    """ReplyReader fed in arbitrary pieces gives the events of the whole text at once (what the server streams
    equals what it answers whole), and they are final: held-back text is only ever emitted once."""
    text = "".join(parts)
    ids = iter(range(1000))
    whole = parse_reply(text, thinking_open, think_tags, tool_calls, make_id=lambda: str(next(ids)))
    ids = iter(range(1000))
    reader = ReplyReader(thinking_open, think_tags, tool_calls, make_id=lambda: str(next(ids)))
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    events = [e for a, b in zip(bounds, bounds[1:]) for e in reader.feed(text[a:b])] + reader.close()
    got = read_events(events)
    assert (got.content, got.reasoning_content, got.tool_calls) == (
        whole.content, whole.reasoning_content, whole.tool_calls)
    assert reader.invalid == whole.invalid_tool_calls
    if not think_tags and not tool_calls:
        assert got.content == text


WITH_CALLS_OR_REASONING = [c for c in CASES if any(m.get("tool_calls") or m.get("reasoning_content") for m in c[1])]


@pytest.mark.parametrize("messages,tools", [c[1:] for c in WITH_CALLS_OR_REASONING],
                         ids=[c[0] for c in WITH_CALLS_OR_REASONING])
def test_a_parsed_reply_renders_back_to_the_same_text(real, messages, tools):
    """The assistant text the template renders, read back with parse_reply (as a generated reply after the thinking
    generation prompt), renders to the same text again: generation, serving and RL see one format."""
    i = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    text = real.apply_chat_template(messages[:i + 1], tools=tools)
    prompt = real.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, enable_thinking=True)
    assert text.startswith(prompt)
    reply = parse_reply(text[len(prompt):].removesuffix("<|im_end|>\n"), thinking_open=True)
    assert reply.invalid_tool_calls == []
    assert real.apply_chat_template(messages[:i] + [reply.message()], tools=tools) == text
