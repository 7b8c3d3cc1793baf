"""`python -m train.demo --quick`: the whole pipeline pretrain -> tool SFT -> SFT -> DPO -> reasoning -> GRPO, a few
steps per stage; and
the demo's report shows a short pretraining run beating random initialisation."""
import importlib.util

import pytest

from tests.train_helpers import QUIZ_MARGIN, one_thread, short_pretrain  # noqa: F401  (fixtures)
from train import demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    rows = demo.main(["--quick", "--out_dir", str(tmp_path), "--device", "cpu", "--threads", "1"])
    assert [name for name, *_ in rows] == ["random init", "pretrain", "tool sft", "sft", "dpo", "reason", "grpo"]
    for name in ("pretrain", "tool_sft", "full_sft", "rlhf", "reason", "grpo"):
        assert (tmp_path / f"{name}_128.pth").is_file(), name
    for log in ("pretrain", "tool_sft", "sft", "dpo", "reason", "grpo"):  # the tool SFT's log is its own
        assert (tmp_path / f"{log}_metrics.jsonl").read_text().count("\n") == demo.QUICK_STEPS, log
    assert all(scores["n"] == rows[0][1]["n"] > 0 for _, scores, *_ in rows)
    for name, scores, seconds, cpu_seconds, _ in rows:
        assert (seconds > 0 and cpu_seconds > 0) or name == "random init"
        assert 0.0 <= scores["answer_held_out_accuracy"] <= 1.0 and scores["answer_seen_n"] > 0
        assert scores["answer_style"] == ("text" if name in ("random init", "pretrain") else "chat")
        assert ("tool_n" in scores) == (scores["answer_style"] == "chat")
    out = capsys.readouterr().out
    assert "after reason: held-out quiz" in out and "Q: What is 3 plus 5?" in out
    assert "generated answers right (chat prompt, greedy inside <answer>): held-out" in out
    assert "after grpo: held-out quiz" in out and "calculator tool (sums no training conversation asks)" in out
    assert "### tool sft: python -m train.sft" in out and "--save_weight tool_sft" in out
    assert "reason done: 3 steps in" in out and f"weights -> {tmp_path / 'reason_128.pth'}" in out
    if importlib.util.find_spec("matplotlib"):  # the `plot` extra (in `dev`)
        assert (tmp_path / "demo_metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_short_pretraining_beats_the_random_init_row(short_pretrain, capsys):  # noqa: F811
    """The demo's report (its table's rows) for a random initialisation and for the same model after a short
    pretraining run: the seen-facts quiz rises by a margin (--quick trains too few steps to show it; the held-out
    quiz needs the demo's whole run)."""
    from minimind.tokenizer import load_tokenizer
    tok = load_tokenizer()
    rows = {name: demo.report(name, short_pretrain[name], tok, short_pretrain["data_dir"], "cpu")
            for name in ("random", "trained")}
    assert rows["trained"]["seen_accuracy"] >= rows["random"]["seen_accuracy"] + QUIZ_MARGIN, rows
    assert "== trained: held-out quiz" in capsys.readouterr().out


def test_an_unfinished_tool_transition_is_said():
    assert demo.tool_transition_note(1.0) is None and demo.tool_transition_note(demo.TOOL_TRANSITION_DONE) is None
    note = demo.tool_transition_note(0.54)
    assert "54% valid calls" in note and "README" in note
