"""Multiple-choice evaluation (minimind.evaluate): the letter picked is the argmax of the next-token logits over
A-D after the C-Eval prompt, batched with left padding exactly as one prompt at a time; files in C-Eval's and
CMMLU's layouts load; bad files name the file and line."""
import csv
import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from minimind.evaluate import LETTERS, evaluate, load_items, main, prompt_text
from minimind.tokenizer import load_tokenizer
from tests.test_chat import save_fp16, tiny

QUESTIONS = [("1 加 1 等于几？", "2", "3", "4", "5", "A"), ("天空是什么颜色？", "红", "蓝", "绿", "黄", "B"),
             ("Which is a city?", "Varenholm", "blue", "seven", "run", "A"), ("最长的问题" * 5, "a", "b", "c", "d", "D"),
             ("3 plus 4?", "6", "8", "7", "9", "C")]


def write_ceval(path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        for i, q in enumerate(QUESTIONS):
            w.writerow([i, *q])
    return path


def write_cmmlu(path):
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # CMMLU's files start with a byte-order mark
        w = csv.writer(f)
        w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
        for i, q in enumerate(QUESTIONS):
            w.writerow([i, *q])
    return path


def one_at_a_time(model, tokenizer, items, template):
    """The reference: each prompt alone, full logits, argmax over the four letter tokens."""
    ids = [tokenizer.encode(x)[0] for x in LETTERS]
    picks = []
    for it in items:
        prompt = torch.tensor([tokenizer.encode(prompt_text(it, template, tokenizer))])
        with torch.no_grad():
            logits = model(prompt).logits[0, -1]
        picks.append(LETTERS[int(logits[ids].argmax())])
    return picks


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_batched_picks_equal_one_prompt_at_a_time(tmp_path, template):
    model, tok = tiny(), load_tokenizer()
    items = load_items(write_ceval(tmp_path / "subject.csv"))
    want = one_at_a_time(model, tok, items, template)
    picks, acc = evaluate(model, tok, items, template, batch_size=3)  # ragged batches: left padding at work
    assert picks == want
    assert acc == sum(p == it["answer"] for p, it in zip(want, items)) / len(items)
    if template == "plain":  # (behind the chat template's fixed ending this random model always says A)
        assert len(set(want)) > 1  # the picks are not all one letter: batching had something to get wrong


def test_the_prompt_is_the_harness_one():
    item = load_items_from_rows([["id", "question", "A", "B", "C", "D", "answer"], [0, " Q? ", "a", "b", "c", "d", "C"]])
    assert prompt_text(item[0], "plain", load_tokenizer()) == "Q?\nA. a\nB. b\nC. c\nD. d\n答案："


def load_items_from_rows(rows):
    import tempfile
    from pathlib import Path
    path = Path(tempfile.mkdtemp()) / "x.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return load_items(path)


def test_layouts_and_bad_files(tmp_path):
    ceval, cmmlu = load_items(write_ceval(tmp_path / "a.csv")), load_items(write_cmmlu(tmp_path / "b.csv"))
    assert ceval == cmmlu and [it["answer"] for it in ceval] == [q[-1] for q in QUESTIONS]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(dict(zip(("question", "A", "B", "C", "D", "answer"), q)),
                                                           ensure_ascii=False) for q in QUESTIONS) + "\n")
    assert load_items(tmp_path / "c.jsonl") == ceval
    with pytest.raises(ValueError, match=r"x.csv:3: answer 'E'"):
        load_items_from_rows([["question", "A", "B", "C", "D", "answer"], ["q", 1, 2, 3, 4, "A"], ["q", 1, 2, 3, 4, "E"]])
    with pytest.raises(ValueError, match=r"x.csv:2: no \['D'\]"):
        load_items_from_rows([["question", "A", "B", "C", "answer"], ["q", 1, 2, 3, "A"]])


def test_the_command_line_scores_a_folder(tmp_path):
    path = save_fp16(tiny(use_moe=True), tmp_path / "full_sft_64_moe.pth")  # MoE, which export cannot take
    data = tmp_path / "ceval"
    data.mkdir()
    write_ceval(data / "math.csv")
    write_cmmlu(data / "misc.csv")
    out = io.StringIO()
    with redirect_stdout(out):
        main([str(path), "--data", str(data), "--out", str(tmp_path / "scores.json"), "--device", "cpu"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n"] == 10 and set(scores["subjects"]) == {"math", "misc"}
    assert scores["overall"] == pytest.approx(sum(s["accuracy"] for s in scores["subjects"].values()) / 2)
    assert "overall" in out.getvalue()
