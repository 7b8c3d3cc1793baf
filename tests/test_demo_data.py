"""The bundled demo data: deterministic, valid in every format, bilingual, with a quiz that is really held out."""
import filecmp
import json
import random
import re

import pytest
import torch

from minimind.config import MiniMindConfig
from minimind.data import build_loader
from minimind.demo import evaluate, write_demo_data
from minimind.demo.quiz import reasoning_prompts
from minimind.demo.world import (CITIES, COLOURS, GRPO_ASK_PERSON, MAX_ADDEND, N_RL_PEOPLE, N_RL_SUMS,
                                 TOOL_SHARE, World, age_fact, age_question, colour_fact)
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer
from tests.train_helpers import QUIZ_MARGIN, short_pretrain  # noqa: F401  (fixture)

SMALL = {"pretrain": 300, "sft": 200, "dpo": 100, "reason": 100, "grpo": 100, "tools": 100}
CJK = re.compile(r"[\u4e00-\u9fff]")
LATIN = re.compile(r"[A-Za-z]{3}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_data(tmp_path_factory.mktemp("demo"))  # default sizes: what the quick start uses


def records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_deterministic(tmp_path):
    a, b = write_demo_data(tmp_path / "a", SMALL), write_demo_data(tmp_path / "b", SMALL)
    assert set(a) == {"pretrain", "sft", "dpo", "reason", "grpo", "tools", "eval"}
    for kind in a:
        assert filecmp.cmp(a[kind], b[kind], shallow=False), kind


def test_every_file_is_valid_and_bilingual(demo, tmp_path):
    tok = load_tokenizer()
    for kind, fmt in [("pretrain", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("reason", "sft"), ("grpo", "rl"),
                      ("tools", "sft")]:
        loader = build_loader(fmt, demo[kind], tok, max_seq_len=256, batch_size=8, cache_dir=tmp_path)
        s = loader.stats()
        assert s["skipped_records"] == 0 and len(loader) > 0 and s["tokens"] > 0
        text = demo[kind].read_text(encoding="utf-8")
        assert CJK.search(text) and LATIN.search(text), kind


def test_reasoning_format(demo):
    pattern = re.compile(r"<think>\n.+\n</think>\n<answer>\n.+\n</answer>", re.S)
    for r in records(demo["reason"]):
        answers = [m["content"] for m in r["conversations"] if m["role"] == "assistant"]
        assert answers and all(pattern.fullmatch(a) for a in answers)


def test_dpo_rejected_answers_are_wrong(demo):
    truth = {item.question: item.answers[0] for item in World().quiz(held_out=False)}
    held_out_facts = {item.answers[0] for item in World().quiz()}
    wrong_subject = 0
    for r in records(demo["dpo"]):
        q, rejected = r["chosen"][0]["content"], r["rejected"][1]["content"]
        assert r["rejected"][0]["content"] == q
        assert r["chosen"][1]["content"] == truth[q] != rejected
        assert rejected not in held_out_facts
        wrong_subject += rejected in truth.values()  # a true fact, about another subject
    assert 0.3 < wrong_subject / len(records(demo["dpo"])) < 0.7


def test_quiz_is_held_out(demo):
    world = World()
    quiz = world.quiz()
    assert len(quiz) == len(json.loads("[" + ",".join(demo["eval"].read_text().splitlines()) + "]"))
    corpus = "".join(demo[k].read_text(encoding="utf-8") for k in ("pretrain", "sft", "dpo", "reason", "grpo"))
    for item in quiz:  # (not after a digit: "10加4等于多少？" is another question than "0加4等于多少？")
        assert not re.search(r"(?<!\d)" + re.escape(item.question), corpus), item.question
    pretrain = demo["pretrain"].read_text(encoding="utf-8")
    for p in world.held_out_people:  # but their facts are stated in the pretraining text
        assert f"{p.en} lives in" in pretrain or f"The home of {p.en}" in pretrain or f"{p.en} is from" in pretrain
        assert p.zh in pretrain
    seen = {item.question for item in world.quiz(held_out=False)}
    assert any(q in corpus for q in seen)  # the seen questions are asked in training


def test_random_model_is_near_chance(demo):
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = MiniMindForCausalLM(cfg)
    r = evaluate(model, load_tokenizer(), demo["eval"].parent)
    assert r["chance"] == 0.25 and r["n"] == 2 * len(World().quiz())
    assert 0.1 <= r["accuracy"] <= 0.45, r  # 80 four-way questions: chance 0.25, standard deviation ~0.05
    assert set(r) >= {"accuracy", "n", "chance", "text_accuracy", "chat_accuracy", "by_category"}
    assert model.training  # evaluate restores the mode


def test_candidates_differ_only_in_the_fact():
    """Every candidate restates the question's canonical fact sentence; only the value differs (no cue but recall)."""
    value = re.compile("(" + "|".join(name for pair in COLOURS + CITIES for name in pair) + r"|\d+)[.。]$")
    for item in World().quiz():
        assert len(set(item.answers)) == len(item.answers) == 4
        stems = {value.sub("", a) for a in item.answers}
        assert len(stems) == 1, item.answers


def test_reason_style_scores_after_the_models_own_reasoning(short_pretrain):  # noqa: F811
    """The reasoning template: the model writes its own <think> part, then the answers are ranked after <answer>.
    A short pretraining run beats its random initialisation there by a margin (on the seen facts: the held-out ones
    need the demo's whole run)."""
    tok, data_dir = load_tokenizer(), short_pretrain["data_dir"]
    quiz = World().quiz()[:3]
    for item, ids in zip(quiz, reasoning_prompts(short_pretrain["trained"], quiz, tok, "cpu")):
        text = tok.decode(ids)
        assert item.question in text and text.endswith("</think>\n<answer>\n")
    scores = {name: evaluate(short_pretrain[name], tok, data_dir, style="reason", split="seen")
              for name in ("random", "trained")}
    assert scores["trained"]["n"] == len(World().quiz(held_out=False)) and "reason_accuracy" in scores["trained"]
    assert scores["trained"]["accuracy"] >= scores["random"]["accuracy"] + QUIZ_MARGIN, \
        {k: v["accuracy"] for k, v in scores.items()}


def test_pretraining_questions_are_seen_or_one_off(demo):
    """Every question in the pretraining text is about the seen part of the world, or a reading exercise
    (World.context_item) whose answer the same document states before the question."""
    world = World()
    seen = {item.question for item in world.quiz(held_out=False)}
    people = {p.en for p in world.people} | {p.zh for p in world.people}
    qa = re.compile(r"(?:Question: |问：)(.+?)\n(?:Answer: |答：)(.+?[.。])")
    n_one_off = 0
    for r in records(demo["pretrain"]):
        for m in qa.finditer(r["text"]):
            question, answer = m.groups()
            if question in seen:
                continue
            n_one_off += 1
            assert answer in r["text"][:m.start()], (question, r["text"])
            assert not any(name in question for name in people) or "How old" in question or "家有多少人" in question
            numbers = [int(x) for x in re.findall(r"\d+", question)]
            assert len(numbers) != 2 or max(numbers) > MAX_ADDEND, question
    assert n_one_off > 1000


def test_context_items_never_ask_the_worlds_colours_cities_or_sums():
    """Reading exercises ask a person of the world only their age or household (a one-off value), stand-ins (not
    named like anyone in the world) their colour or city, and sums with an addend above MAX_ADDEND; every answer
    names its subject first."""
    import random
    world, rng = World(), random.Random(0)
    kinds = set()
    for _ in range(500):
        item = world.context_item(rng)
        kinds.add(item.category)
        assert item.answers[0].startswith(item.subject) and item.value in item.answers[0]
        if item.category == "sum":
            assert max(item.operands) > MAX_ADDEND and item.value == str(sum(item.operands))
        elif item.category in ("colour", "city", "place"):
            assert item.subject not in world.names
        else:
            assert item.category == "age" and item.subject in world.names
    assert kinds == {"age", "colour", "city", "sum", "place"}


def test_exact_match_reads_the_answer():
    from minimind.demo.answers import extract_answer, is_right
    item = World().quiz()[0]  # "What is the favourite colour of Rayand?"
    right, wrong = item.answers[0], item.answers[1]
    assert is_right(extract_answer(right), item) and is_right(extract_answer(f" {right}\n"), item)
    assert is_right(extract_answer(item.value), item) and is_right(extract_answer(item.value + "."), item)
    assert not is_right(extract_answer(wrong), item)
    assert not is_right(extract_answer(f"{right} {right}"), item)  # extra text in a chat reply is wrong
    assert not is_right(extract_answer(f"Liyan likes {item.value}."), item)  # the right value about another person
    assert is_right(extract_answer(f"The favourite colour of Rayand is {item.value}."), item)  # a paraphrase
    assert is_right(extract_answer(f"{right} Question: 1 + 1?", "text"), item)  # text: the first sentence counts
    template = "<think>\nThe question asks which colour Rayand likes.\n</think>\n<answer>\n{}\n</answer>"
    assert is_right(extract_answer(template.format(right)), item)
    assert not is_right(extract_answer(template.format(wrong)), item)
    assert not is_right(extract_answer(f"<think>\n{right} {right}"), item)  # no <answer>: no answer
    zh = next(i for i in World().quiz() if i.lang == "zh" and i.category == "sum")
    assert is_right(extract_answer(zh.answers[0]), zh) and is_right(extract_answer(zh.value + "。"), zh)


def test_exact_match_scores_generated_replies(demo, monkeypatch):
    from minimind.demo import answers as em
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model, tok = MiniMindForCausalLM(cfg), load_tokenizer()
    r = em.exact_match(model, tok, demo["eval"].parent, max_new_tokens=4)
    assert r["n"] == len(World().quiz()) and r["accuracy"] == 0.0 and len(r["replies"]) == r["n"]
    assert model.training  # generation restores the mode
    seen = em.exact_match(model, tok, demo["eval"].parent, style="text", split="seen", max_new_tokens=4)
    assert seen["n"] == len(World().quiz(held_out=False))
    # the scoring of replies, with a stand-in for generation: every other reply right
    monkeypatch.setattr(em, "generate_answers", lambda model, tok, quiz, *a: [
        item.answers[i % 2] for i, item in enumerate(quiz)])
    r = em.exact_match(model, tok, demo["eval"].parent)
    assert r["accuracy"] == 0.5 and all(ok == (i % 2 == 0) for i, (_, _, ok) in enumerate(r["replies"]))


def test_grpo_prompts_are_verifiable_and_never_held_out(demo):
    """GRPO asks about the rl part of the world and the seen part, with the canonical answer sentence in `answer`
    (no other training file asks the rl part's questions), and GRPO_ASK_PERSON of its prompts ask the age of a
    person no other data asks about (rl or held out), without an `answer`; no GRPO prompt is a held-out question."""
    world = World()
    rl = {item.question: item.answers[0] for item in world.items(False, random.Random(0), rl=True)}
    assert len(rl) == 2 * (2 * N_RL_PEOPLE + N_RL_SUMS)  # 2 languages; colour and city
    seen = {item.question: item.answers[0] for item in world.quiz(held_out=False)}
    held_out = {item.question for item in world.quiz()}
    assert not set(rl) & (held_out | set(seen))
    asked = {**rl, **seen}
    assert {item.question for item in world.grpo_items()} == set(asked)
    unasked = {age_question(name, lang) for p in world.rl_people + world.held_out_people
               for name, lang in ((p.en, "en"), (p.zh, "zh"))}
    rs, n_age = records(demo["grpo"]), 0
    for r in rs:
        q = r["conversations"][0]["content"]
        assert q not in held_out
        if q in unasked:
            assert "answer" not in r
            n_age += 1
        else:
            assert asked[q] == r["answer"] == r["conversations"][1]["content"]
    assert abs(n_age / len(rs) - GRPO_ASK_PERSON) < 0.12
    answers = {r.get("answer") for r in rs}
    assert answers & set(rl.values()) and answers & set(seen.values())
    corpus = "".join(demo[k].read_text(encoding="utf-8") for k in ("pretrain", "sft", "dpo", "reason"))
    for q in rl:
        assert not re.search(r"(?<!\d)" + re.escape(q), corpus), q


def test_the_asked_person_reward():
    """1 for the answer's sentence about the person asked, with any number; 0 for another person, another form,
    or a prompt that is not an age question."""
    from minimind.demo.rewards import asked_person
    world = World()
    p, q = world.held_out_people[0], world.seen_people[0]
    prompts = [[{"role": "user", "content": age_question(p.en, "en")}]] * 4 + [
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": age_question(p.zh, "zh")}]] * 2
    prompts.append([{"role": "user", "content": "What is 1 plus 2?"}])
    replies = [f" {age_fact(p.en, 23, 'en')}\n", age_fact(q.en, 23, "en"), colour_fact(p, p.colour, "en"),
               f"{p.en} is old.", age_fact(p.zh, 4, "zh"), age_fact(q.zh, 4, "zh"), "1 plus 2 equals 3."]
    assert asked_person(prompts, replies) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kind", ["sft", "tools"])
def test_tool_conversations(demo, kind):
    """The tool SFT's records, and TOOL_SHARE of the SFT records, call the calculator (minimind-3's blocks in
    ChatML), with the tool's true result, then that result as the answer; none asks a sum of the tool eval."""
    from minimind.demo import tools
    calls = 0
    for r in records(demo[kind]):
        conv = r["conversations"]
        if conv[0]["content"] != tools.TOOLS_SYSTEM:
            assert "<tool_call>" not in json.dumps(r, ensure_ascii=False)
            continue
        calls += 1
        assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]
        a, b = map(int, re.findall(r"\d+", conv[1]["content"]))
        assert (a, b) not in tools.EVAL_PAIRS
        assert tools.check_call(conv[2]["content"], a, b) == (True, {"a": a, "b": b})
        assert conv[3]["content"] == f"<tool_response>\n{a + b}\n</tool_response>"
        assert conv[4]["content"] in (f"{a + b}.", f"{a + b}。")
    assert abs(calls / len(records(demo[kind])) - (TOOL_SHARE if kind == "sft" else 1.0)) < 0.05


def test_tool_calls_are_checked():
    from minimind.demo.tools import check_call
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 40}}\n</tool_call>'
    assert check_call(call, 3, 40) == (True, {"a": 3, "b": 40})
    assert check_call(call, 3, 41) == (False, {"a": 3, "b": 40})  # wrong numbers: invalid, but the tool still runs
    assert check_call("3 plus 40 equals 43.", 3, 40) == (False, None)
    assert check_call(call.replace("add", "mul"), 3, 40) == (False, None)
    assert check_call(call.replace('"b": 40', '"b": "40"'), 3, 40) == (False, None)
    assert check_call(call[:-3], 3, 40) == (False, None)  # never closed
    assert check_call(call + "\n" + call, 3, 40)[0] is False
    assert check_call("Sure. " + call, 3, 40)[0] is False


def test_tool_use_scores_calls_then_answers(monkeypatch):
    """tool_use: the first replies are checked, the tool runs on the model's own arguments, the second replies are
    scored; a random model calls nothing; a stand-in that calls right and then answers right half the time."""
    from minimind.demo import answers, tools
    torch.manual_seed(0)
    cfg = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model, tok = MiniMindForCausalLM(cfg), load_tokenizer()
    r = tools.tool_use(model, tok)
    assert r["n"] == 2 * len(tools.EVAL_PAIRS)
    assert r["well_formed_calls"] == r["valid_calls"] == 0.0 == r["right_answers"]
    seen_prompts = []

    def stand_in(model, tok, prompts, device, max_new_tokens):
        texts = [tok.decode(p) for p in prompts]
        seen_prompts.extend(texts)
        out = []
        for i, t in enumerate(texts):
            a, b = map(int, re.findall(r"(\d+)(?: plus |加)(\d+)", t)[0])
            if "<tool_response>" not in t:
                out.append(tools.tool_call_text({"name": "add", "arguments": {"a": a, "b": b}}))
            else:
                assert f"<tool_response>\n{a + b}\n</tool_response>" in t
                out.append(f"{a} plus {b} equals {a + b}." if i % 2 == 0 else "I do not know.")
        return out
    monkeypatch.setattr(answers, "greedy_replies", stand_in)
    r = tools.tool_use(model, tok)
    assert r["well_formed_calls"] == r["valid_calls"] == 1.0 and 0 < r["right_answers"] <= 0.5
    assert all(t.startswith(f"<|im_start|>system\n{tools.TOOLS_SYSTEM}<|im_end|>") for t in seen_prompts)
