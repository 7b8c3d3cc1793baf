"""Stop and resume: an interrupted-and-resumed run equals the uninterrupted one exactly (CPU, fp32), and SIGTERM
saves a resume checkpoint and exits cleanly."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_helpers import ROOT, demo_data, one_thread, tiny_flags  # noqa: F401  (fixtures)
from train import engine, pretrain, sft

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_then_resumed_run_is_bit_identical(demo_data, tmp_path):  # noqa: F811
    """4 steps straight vs 2 steps, stop, resume, 2 more: the same losses and weights, bit for bit. Two micro-steps
    per step and warmup, so accumulation, the schedule, AdamW state and the data position all have to resume."""
    common = ["--accumulation_steps", "2", "--warmup_iters", "2", "--from_weight", "none"]
    straight = sft.main(tiny_flags(tmp_path / "a", demo_data["sft"], steps=4, extra=common))

    first = sft.main(tiny_flags(tmp_path / "b", demo_data["sft"], steps=4, extra=[*common, "--stop_after", "2"]))
    assert first["interrupted"] and first["steps"] == 2
    state = torch.load(first["resume_path"], weights_only=False)
    assert state["step"] == 2 and not state["finished"] and state["loader"]["position"] == 4
    second = sft.main(tiny_flags(tmp_path / "b", demo_data["sft"], steps=4, extra=[*common, "--from_resume", "1"]))
    assert not second["interrupted"] and second["steps"] == 4

    assert first["losses"] + second["losses"] == straight["losses"]
    assert second["tokens"] == straight["tokens"]  # counted over both runs; the rate over this run's tokens only
    assert second["tokens_per_s"] * second["seconds"] == pytest.approx(second["tokens"] - first["tokens"])
    a, b = _params(straight["model"]), _params(second["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "b" / "sft_metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # elapsed_s counts training time over both runs: it goes on from the stopped run's, not from 0
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[2] >= state["elapsed_s"] >= elapsed[1] > 0


def test_sigterm_saves_resume_state_and_exits_cleanly(demo_data, tmp_path):  # noqa: F811
    argv = tiny_flags(tmp_path, demo_data["pretrain"], steps=10000, batch_size=2, seq=32)
    proc = subprocess.Popen([sys.executable, "-m", "train.pretrain", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "pretrain_metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == engine.STOPPED_EXIT_STATUS, err[-2000:]  # saved, but not finished
    assert "SIGTERM" in err and "--from_resume 1" in out + err
    state = torch.load(tmp_path / "pretrain_64_resume.pt", weights_only=False)
    assert state["step"] >= 2 and not state["finished"]
    assert (tmp_path / "pretrain_64.pth").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_resume_refuses_a_different_model(demo_data, tmp_path):  # noqa: F811
    pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2, extra=["--stop_after", "1"]))
    resume = tmp_path / "pretrain_64_resume.pt"
    from train.engine import ConfigError
    with pytest.raises(ConfigError, match="num_hidden_layers 2 \\(now 3\\)"):
        pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2,
                                 extra=["--from_resume", str(resume), "--num_hidden_layers", "3"]))
    with pytest.raises(ConfigError, match="--batch_size 4, got --batch_size 2"):
        pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2, batch_size=2,
                                 extra=["--from_resume", "1"]))
    with pytest.raises(ConfigError, match="--from_resume .*pretrain_64_resume.pt does not fit .*seed=42"):
        pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2, extra=["--from_resume", "1", "--seed", "7"]))
    with pytest.raises(ConfigError, match="missing_resume.pt: no such file"):
        pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2,
                                 extra=["--from_resume", str(tmp_path / "missing_resume.pt")]))
    with pytest.raises(ConfigError, match="needs --deepspeed"):
        pretrain.main(tiny_flags(tmp_path, demo_data["pretrain"], steps=2, extra=["--from_resume", str(tmp_path)]))
