"""minimind-3's t2t SFT data: reasoning, tools and tool calls as objects or JSON strings, the loss mask, bad records,
and MiniMind's two SFT augmentations (exact on tokens, reproducible, resumable). Uses a small minimind-3-format
tokenizer trained here (so nothing needs ../shared)."""
import json
import re

import numpy as np
import pytest

from minimind.chat_template import EMPTY_THINK
from minimind.data import ChatAugmenter, DataError, build_loader, default_ratios, load_token_cache
from minimind.data.augment import SYSTEM_PROMPTS
from minimind.tokenizer import load_tokenizer
from tests.test_data import write_jsonl
from tests.train_helpers import one_thread  # noqa: F401  (fixture)

TOOLS = [{"type": "function", "function": {"name": "calculate_math", "description": "计算数学表达式",
                                           "parameters": {"type": "object",
                                                          "properties": {"expression": {"type": "string"}}}}}]
CALLS = [{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}]


def t2t_records():
    """Record shapes of sft_t2t: plain, with reasoning, a think prefix, tool calls (JSON strings as in the file and
    as objects), several tool messages, answers starting with whitespace, several turns."""
    return [
        {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
        {"conversations": [{"role": "system", "content": "# Tools ...", "tools": json.dumps(TOOLS, ensure_ascii=False)},
                           {"role": "user", "content": "帮我算一下 256 乘以 37 等于多少"},
                           {"role": "assistant", "content": "", "tool_calls": json.dumps(CALLS, ensure_ascii=False)},
                           {"role": "tool", "content": "{\"result\":\"9472\"}"},
                           {"role": "assistant", "content": "256 乘以 37 等于 9472。"}]},
        {"conversations": [{"role": "system", "content": "", "tools": TOOLS},
                           {"role": "user", "content": "算两个"},
                           {"role": "assistant", "content": None, "reasoning_content": "两次调用",
                            "tool_calls": [{"type": "function",
                                            "function": {"name": "calculate_math",
                                                         "arguments": "{\"expression\": \"1+1\"}"}}, CALLS[0]]},
                           {"role": "tool", "content": "2"}, {"role": "tool", "content": "9472"},
                           {"role": "assistant", "content": "2 和 9472"}]},
        {"conversations": [{"role": "user", "content": "why?"},
                           {"role": "assistant", "content": "because", "reasoning_content": "think it over"}]},
        {"conversations": [{"role": "user", "content": "code"},
                           {"role": "assistant", "content": "<think>\nplan\n</think>\n\n    indented code"}]},
        {"conversations": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": " leading space"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "\t\ttabs first"}, {"role": "user", "content": "c"},
                           {"role": "assistant", "content": "plain", "reasoning_content": ""}]},
        {"conversations": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "  \n  odd"}]},
    ]


def normalised(record):
    """(messages, tools) as the renderer takes them: JSON strings parsed, tools off the system message."""
    messages, tools = [], None
    for m in record["conversations"]:
        m = dict(m)
        if "tools" in m:
            t = m.pop("tools")
            tools = json.loads(t) if isinstance(t, str) else t
        if isinstance(m.get("tool_calls"), str):
            m["tool_calls"] = json.loads(m["tool_calls"])
        m["content"] = m.get("content") or ""
        messages.append(m)
    return messages, tools


@pytest.fixture(scope="module")
def tok3(tmp_path_factory):
    """A minimind-3-format tokenizer trained on the records' texts and some more (saved and loaded back)."""
    from train.tokenizer import train_tokenizer
    folder = tmp_path_factory.mktemp("tok3")
    corpus = write_jsonl(folder / "corpus.jsonl", t2t_records() * 3 + [
        {"text": f"the quick brown fox {i} jumps over 懒狗 {i % 7} 数据 模型 calculate expression result"}
        for i in range(100)] + [{"text": "def f():\n\n    return 1\n\n  \n  odd\n    x"}] * 50)
    train_tokenizer([corpus], vocab_size=500, chat_format="minimind3").save(folder / "tok")
    tok = load_tokenizer(folder / "tok")
    assert tok.chat_format == "minimind3"
    return tok


@pytest.fixture
def t2t_file(tmp_path):
    return write_jsonl(tmp_path / "sft_t2t.jsonl", t2t_records())


def rows(loader):
    """{item: (ids, labels)} of one epoch, trimmed of padding."""
    out = {}
    for idx, batch in zip(loader.plan(), loader):
        for i, ids, labels, attn in zip(idx, batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(attn.sum())
            out[int(i)] = (ids[:n].tolist(), labels[:n].tolist())
    return out


def test_t2t_records_render_as_the_template(tok3, t2t_file):
    loader = build_loader("sft", t2t_file, tok3, max_seq_len=4096, batch_size=1, drop_last=False)
    got = rows(loader)
    assert sorted(got) == list(range(len(t2t_records())))
    for i, record in enumerate(t2t_records()):
        messages, tools = normalised(record)
        ids, mask = tok3.encode_chat(messages, tools)
        assert got[i] == (ids, [t if m else -100 for t, m in zip(ids, mask)])
    # JSON strings and objects give the same tokens
    obj = dict(t2t_records()[1])
    obj["conversations"] = [dict(m) for m in obj["conversations"]]
    obj["conversations"][0]["tools"] = TOOLS
    obj["conversations"][2]["tool_calls"] = CALLS
    assert tok3.encode_chat(*normalised(obj)) == tok3.encode_chat(*normalised(t2t_records()[1]))
    text = tok3.decode(got[1][0])
    assert "<tool_call>\n{\"name\": \"calculate_math\", \"arguments\": {\"expression\": \"256 * 37\"}}\n</tool_call>" \
        in text and "<tool_response>\n{\"result\":\"9472\"}\n</tool_response>" in text and "<tools>" in text


def assistant_targets(ids, labels, tok):
    """The decoded runs of target tokens."""
    runs, cur = [], []
    for t, lab in zip(ids + [0], labels + [-100]):
        if lab != -100:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def test_loss_mask_covers_every_assistant_span(tok3, t2t_file):
    for i, (ids, labels) in rows(build_loader("sft", t2t_file, tok3, max_seq_len=4096, batch_size=1,
                                              drop_last=False)).items():
        text = tok3.decode(ids)
        spans = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", text, re.DOTALL)
        assert assistant_targets(ids, labels, tok3) == spans
        assert all(s.startswith("<think>\n") for s in spans)


# ---- bad records ----

def conv(*messages):
    return {"conversations": list(messages)}


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
CALLER = {"role": "assistant", "content": "", "tool_calls": json.dumps(CALLS)}
T2T_BAD = [
    (conv(U, {"role": "assistant", "content": "", "tool_calls": "[{\"name\": \"f\", "}),
     "conversations\\[1\\].tool_calls is not valid JSON"),
    (conv(U, {"role": "tool", "content": "3"}, A),
     "conversations\\[1\\] is a tool message with no preceding tool call"),
    (conv(U, A, {"role": "tool", "content": "3"}), "is a tool message with no preceding tool call"),
    (conv(U, {"role": "function", "content": "x"}, A), "conversations\\[1\\] has unknown role 'function'"),
    (conv({"role": "user", "content": "q", "tools": TOOLS}, A), "tools belong on the leading system message"),
    (conv({"role": "system", "content": "", "tools": "[{oops"}, U, A), "conversations\\[0\\].tools is not valid JSON"),
    (conv({"role": "system", "content": "", "tools": "{\"a\": 1}"}, U, A), "must be a list of function schemas"),
    (conv(U, {"role": "assistant", "content": "", "tool_calls": "[{\"arguments\": {}}]"}), "has no function 'name'"),
    (conv(U, {"role": "assistant", "content": "", "tool_calls": "[{\"name\": \"f\", \"arguments\": \"{x\"}]"}),
     "arguments is not valid JSON"),
    (conv(U, {"role": "assistant", "content": "", "tool_calls": "{\"name\": \"f\", \"arguments\": {}}"}),
     "must be a list of calls"),
    (conv({"role": "user", "content": "q", "tool_calls": CALLS}, A), "a user message with tool_calls"),
    (conv(U, {"role": "assistant"}), "conversations\\[1\\] has no 'content'"),
    (conv(U, {"role": "assistant", "content": "a", "reasoning_content": 3}), "reasoning_content must be a string"),
    (conv(U, A, {"role": "system", "content": "late"}, U, A), "system message after the first"),
    (conv(U, U, A), "conversations\\[1\\] is a user message following a user message"),
    (conv(A), "conversations\\[0\\] is an assistant message following the start"),
    (conv(U), "no assistant turn"),
]


@pytest.mark.parametrize("bad,message", T2T_BAD)
def test_bad_t2t_record_names_file_and_line(tok3, tmp_path, bad, message):
    good = t2t_records()[1]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        build_loader("sft", path, tok3, max_seq_len=64, batch_size=1)
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        loader = build_loader("sft", path, tok3, max_seq_len=512, batch_size=1, skip_bad_records=True)
    assert loader.stats()["skipped_records"] == 1 and len(loader) == 3


def test_t2t_shapes_that_are_fine(tok3, tmp_path):
    ok = [conv(U, CALLER, {"role": "tool", "content": "1"}),  # ends with the tool result
          conv(U, CALLER, {"role": "tool", "content": "1"}, A, U, A),
          conv({"role": "system", "content": "s"}, U, {"role": "assistant", "content": "a", "tool_calls": ""}),
          conv(U, {"role": "assistant", "content": "a", "tool_calls": None, "reasoning_content": None})]
    path = write_jsonl(tmp_path / "ok.jsonl", ok)
    assert build_loader("sft", path, tok3, max_seq_len=512, batch_size=1).stats()["records"] == 4


def test_minimind2_format_keeps_its_rules(tmp_path):
    """With MiniMind2's tokenizer, the t2t shapes are refused as before (its template has no tool role)."""
    path = write_jsonl(tmp_path / "m2.jsonl", [t2t_records()[0], t2t_records()[1]])
    with pytest.raises(DataError, match=r"m2.jsonl:2: conversations\[3\] has role 'tool' where 'user' was expected"):
        build_loader("sft", path, load_tokenizer(), max_seq_len=64, batch_size=1)


# ---- augmentations ----

def with_system_prompt(record, system):
    """(messages, tools) of a record after MiniMind's system-prompt augmentation chose prompt `system` (or None)."""
    messages, tools = normalised(record)
    if system is not None and not tools and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SYSTEM_PROMPTS[system]}] + messages
    return messages, tools


def span_mask(text, offsets):
    """The loss mask by its definition, from the text: 1 on each token that starts (character offsets from the
    tokenizer) inside an assistant target, from after `<|im_start|>assistant\\n` through `<|im_end|>\\n`."""
    spans = [m.span(1) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", text, re.DOTALL)]
    return [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]


def test_augmented_tokens_are_exactly_the_augmented_text(tok3, t2t_file):
    """Every record, every variant: the token-level augmentation gives the ids of the augmented text (MiniMind's
    text-level replace of the empty think blocks) and its assistant spans."""
    cache = load_token_cache(t2t_file, "sft", tok3)
    aug = ChatAugmenter(tok3, 0.5, 0.5)
    replaced = 0
    for i, record in enumerate(t2t_records()):
        for system in (None, 3):
            for drop in (False, True):
                tokens, mask = cache.sequence(i)
                ids, m = aug.apply(tokens, mask, cache.extras, i, system, drop)
                messages, tools = with_system_prompt(record, system)
                text = tok3.apply_chat_template(messages, tools=tools)
                if drop:
                    text = text.replace(EMPTY_THINK, "")
                enc = tok3.hf.encode(text, add_special_tokens=False)
                assert ids.tolist() == enc.ids, (i, system, drop)
                assert m.tolist() == span_mask(text, enc.offsets), (i, system, drop)
        edits = cache.extras.edits_of(i)
        replaced += int((edits[:, 3] > edits[:, 2]).sum())
    assert replaced > 0  # some answers start with whitespace that merges with the block's newlines
    # the tools record and the system record never get a system prompt
    assert cache.extras.system_ok.tolist() == [1, 0, 0, 1, 1, 0, 1]


def test_minimind2_system_prompt_replaces_the_default(tmp_path):
    tok = load_tokenizer()
    recs = [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    cache = load_token_cache(write_jsonl(tmp_path / "m2.jsonl", recs), "sft", tok)
    ids, _ = ChatAugmenter(tok, 1.0, 0.0).apply(*cache.sequence(0), cache.extras, 0, 7, False)
    want = tok.encode_chat([{"role": "system", "content": SYSTEM_PROMPTS[7]}] + recs[0]["conversations"])[0]
    assert ids.tolist() == want


def test_augmentation_is_reproducible_and_resumable(tok3, tmp_path):
    recs = t2t_records() * 12
    path = write_jsonl(tmp_path / "many.jsonl", recs)
    kw = dict(max_seq_len=256, batch_size=4, add_system_ratio=0.5, drop_empty_think_ratio=0.5)

    def epochs(loader, n=2):
        out = []
        for e in range(n):
            loader.set_epoch(e)
            out.append([b["input_ids"].tolist() for b in loader])
        return out

    a = epochs(build_loader("sft", path, tok3, seed=1, **kw))
    assert a == epochs(build_loader("sft", path, tok3, seed=1, **kw))
    plain = epochs(build_loader("sft", path, tok3, seed=1, max_seq_len=256, batch_size=4))
    assert a != plain and a[0] != a[1]
    # the same item gets other variants in another epoch or under another seed
    l1 = build_loader("sft", path, tok3, seed=1, **kw)
    draws = [l1.augment.draw(1, e, i) for e in (0, 1) for i in range(len(recs))]
    assert draws[:len(recs)] != draws[len(recs):]
    # resume mid-epoch: the rest is exactly the uninterrupted run's
    run = build_loader("sft", path, tok3, seed=1, **kw)
    it = iter(run)
    got = [next(it)["input_ids"].tolist() for _ in range(5)]
    state = json.loads(json.dumps(run.state_dict()))
    resumed = build_loader("sft", path, tok3, seed=1, **kw)
    resumed.load_state_dict(state)
    got += [b["input_ids"].tolist() for b in resumed]
    resumed.set_epoch(1)
    assert [got, [b["input_ids"].tolist() for b in resumed]] == a
    # another world size sees the same rows
    ranks = [build_loader("sft", path, tok3, seed=1, rank=r, world_size=2, **kw) for r in range(2)]
    shards = [[b["input_ids"].tolist() for b in r] for r in ranks]
    assert shards[0] == a[0][0::2][:len(shards[0])] and shards[1] == a[0][1::2][:len(shards[1])]
    # other ratios: the saved position would mean other rows
    other = build_loader("sft", path, tok3, seed=1, **{**kw, "add_system_ratio": 0.1})
    with pytest.raises(ValueError, match="augment_ratios"):
        other.load_state_dict(state)


def test_augmentation_rates(tok3, tmp_path):
    """MiniMind's defaults, measured over many draws: a system prompt on ~20% of the eligible conversations, the
    empty think blocks dropped on ~80%."""
    add, drop = default_ratios("minimind3")
    assert (add, drop) == (0.2, 0.8) and default_ratios("minimind2") == (0.0, 0.0)
    aug = ChatAugmenter(tok3, add, drop)
    draws = [aug.draw(42, e, i) for e in range(4) for i in range(2000)]
    systems = [s for s, _ in draws if s is not None]
    assert abs(len(systems) / len(draws) - 0.2) < 0.02 and abs(np.mean([d for _, d in draws]) - 0.8) < 0.02
    assert set(systems) == set(range(len(SYSTEM_PROMPTS)))
    with pytest.raises(ValueError, match="add_system_ratio must be in"):
        ChatAugmenter(tok3, 1.5, 0)


def test_augmentation_keeps_a_target_after_truncation(tok3, tmp_path):
    """A system prompt that would push every target past max_seq_len is not added (the row keeps its loss)."""
    rec = {"conversations": [{"role": "user", "content": "q " * 10}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "edge.jsonl", [rec] * 8)
    n = len(tok3.encode_chat(rec["conversations"])[0])
    first = tok3.encode_chat(rec["conversations"])[1].index(1)
    loader = build_loader("sft", path, tok3, max_seq_len=first + 1, batch_size=8, add_system_ratio=1.0)
    batch = next(iter(loader))
    assert n > first + 1 and (batch["labels"] != -100).any(dim=1).all()


def test_only_chat_kinds_are_augmented(tok3, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "hello world"}] * 4)
    with pytest.raises(ValueError, match="cannot be augmented"):
        build_loader("pretrain", path, tok3, max_seq_len=8, batch_size=1, add_system_ratio=0.2)


def test_sft_stage_on_t2t_data(tok3, tmp_path, one_thread):  # noqa: F811
    """python -m train.sft with a minimind-3 tokenizer: MiniMind's augmentation defaults, kept across a resume (other
    ratios are refused), and the model card names the tokenizer, whose format comes back with it."""
    import torch

    from minimind.weights import load_tokenizer_for
    from tests.train_helpers import tiny_flags
    from train import engine, sft
    folder = tmp_path / "tok"
    tok3.save(folder)
    data = write_jsonl(tmp_path / "sft_t2t.jsonl", t2t_records() * 6)
    argv = tiny_flags(tmp_path / "out", data, steps=3, batch_size=2, seq=256,
                      extra=["--tokenizer", folder, "--from_weight", "none"])
    stopped = sft.main(argv + ["--stop_after", "1"])
    assert stopped["interrupted"]
    state = torch.load(stopped["resume_path"], weights_only=False)
    assert state["loader"]["augment_ratios"] == [0.2, 0.8]
    with pytest.raises(engine.ConfigError, match="augment_ratios"):
        sft.main(argv + ["--from_resume", "1", "--drop_empty_think_ratio", "0.5"])
    done = sft.main(argv + ["--from_resume", "1"])
    assert done["steps"] == 3 and not done["interrupted"]
    assert load_tokenizer_for(done["weights_path"]).chat_format == "minimind3"
    with pytest.raises(engine.ConfigError, match="--add_system_ratio must be in"):
        sft.main(argv + ["--add_system_ratio", "2"])


@pytest.mark.parametrize("which", ["trained", "real"])
def test_proven_deletions_equal_checked_ones(tok3, which, monkeypatch):
    """The think-drop edits that deletion_is_exact proves without tokenising again are those that tokenising the
    stripped text gives (on the trained tokenizer and on minimind-3's own)."""
    from minimind.chat_template import render
    from minimind.data import augment
    from tests.reference_files import reference_folder
    tok = tok3 if which == "trained" else load_tokenizer(reference_folder("minimind3-tokenizer"))
    assert augment.regex_byte_level(tok)
    answers = ["x", " x", "  x", "\tx", "\u3000全角", "数据", "\n\nx", "<b>", "", "1+1", "'s", "  \n  odd"]
    convs = [normalised(r) for r in t2t_records()] + [
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": a}], None) for a in answers] + [
        ([{"role": "user", "content": f"literal {EMPTY_THINK}in a prompt"}, {"role": "assistant", "content": "a"}],
         None)]
    rendered = [render(tok.format, m, t) for m, t in convs]
    encoded = tok.encode_rendered(rendered)
    retokenised = []
    encode = tok.encode_rendered
    monkeypatch.setattr(tok, "encode_rendered", lambda r: retokenised.extend(r) or encode(r))
    proven = augment.chat_extras(tok, convs, rendered, encoded)
    assert 0 < len(retokenised) < len(convs) // 2  # only where no proof applies (whitespace after a block, ...)
    monkeypatch.setattr(augment, "regex_byte_level", lambda tokenizer: False)
    checked = augment.chat_extras(tok, convs, rendered, encoded)
    for a, b in zip(proven, checked):
        np.testing.assert_array_equal(a, b)
    assert proven[1].sum() > len(convs)  # edits for (almost) every conversation; some are replacements
