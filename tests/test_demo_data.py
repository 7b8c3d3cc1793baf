"""The bundled demo data: deterministic, valid in every format, bilingual, with a quiz that is really held out."""
import filecmp
import json
import re

import pytest
import torch

from minimind.config import MiniMindConfig
from minimind.data import build_loader
from minimind.demo import evaluate, write_demo_data
from minimind.demo.quiz import reasoning_prompts
from minimind.demo.world import CITIES, COLOURS, World
from minimind.model import MiniMindForCausalLM
from minimind.tokenizer import load_tokenizer
from tests.train_helpers import QUIZ_MARGIN, short_pretrain  # noqa: F401  (fixture)

SMALL = {"pretrain": 300, "sft": 200, "dpo": 100, "reason": 100}
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
    assert set(a) == {"pretrain", "sft", "dpo", "reason", "eval"}
    for kind in a:
        assert filecmp.cmp(a[kind], b[kind], shallow=False), kind


def test_every_file_is_valid_and_bilingual(demo, tmp_path):
    tok = load_tokenizer()
    for kind in ("pretrain", "sft", "dpo", "reason"):
        loader = build_loader(kind, demo[kind], tok, max_seq_len=256, batch_size=8, cache_dir=tmp_path)
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
    for r in records(demo["dpo"]):
        q = r["chosen"][0]["content"]
        assert r["rejected"][0]["content"] == q
        assert r["chosen"][1]["content"] == truth[q] != r["rejected"][1]["content"]


def test_quiz_is_held_out(demo):
    world = World()
    quiz = world.quiz()
    assert len(quiz) == len(json.loads("[" + ",".join(demo["eval"].read_text().splitlines()) + "]"))
    corpus = "".join(demo[k].read_text(encoding="utf-8") for k in ("pretrain", "sft", "dpo", "reason"))
    for item in quiz:
        assert item.question not in corpus, item.question
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
