"""`python -m train.demo --quick`: the whole pipeline pretrain -> SFT -> DPO -> reasoning, a few steps per stage."""
import pytest

from tests.train_helpers import one_thread  # noqa: F401  (fixture)
from train import demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    rows = demo.main(["--quick", "--out_dir", str(tmp_path), "--device", "cpu", "--threads", "1"])
    assert [name for name, *_ in rows] == ["random init", "pretrain", "sft", "dpo", "reason"]
    for name in ("pretrain", "full_sft", "rlhf", "reason"):
        assert (tmp_path / f"{name}_128.pth").is_file(), name
    for name, scores, _, _ in rows:
        assert scores["n"] > 0 and 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["seen_accuracy"] <= 1.0
        assert 0.0 <= scores["answer_held_out_accuracy"] <= 1.0 and scores["answer_seen_n"] > 0
        assert scores["answer_style"] == ("text" if name in ("random init", "pretrain") else "chat")
    out = capsys.readouterr().out
    assert "after reason: held-out quiz" in out and "Q: What is 3 plus 5?" in out
    assert "generated answers right (chat prompt, greedy inside <answer>): held-out" in out
