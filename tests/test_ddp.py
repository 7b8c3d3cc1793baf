"""Two gloo processes on the CPU (torchrun) take the same steps as one process with the same global batch, and a
run stopped on two processes resumes on one.

Why they agree: the loader composes global batches independently of the number of processes (rank r takes global
batches r, r+W, ...), every micro-batch's loss is its own per-token mean, each process backpropagates loss / A and
DDP averages gradients over W processes. So one step minimises the mean over the W*A micro-batches either way:
2 processes x 1 micro-step == 1 process x 2 micro-steps. Only the order of floating-point sums differs (allreduce
vs accumulation), hence a tolerance instead of bit equality.
"""
import pytest
import torch

from tests.train_helpers import demo_data, one_thread, run_module, tiny_flags  # noqa: F401  (fixtures)
from train import pretrain

STEPS = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _torchrun(nproc, argv, status=0):
    r = run_module(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                    "train.pretrain", *argv], timeout=300)
    assert r.returncode == status, r.stderr[-3000:]
    return r


def _close(a, b):
    # fp32, 4 AdamW steps at lr 3e-3: sums in another order differ by ~1e-7 relative; 1e-5 is far below one update
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_two_processes_equal_one_with_the_same_global_batch(demo_data, tmp_path):  # noqa: F811
    two = tiny_flags(tmp_path / "two", demo_data["pretrain"], steps=STEPS, batch_size=2)
    _torchrun(2, two)
    state = torch.load(tmp_path / "two" / "pretrain_64_resume.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == STEPS and state["loader"]["position"] == 2 * STEPS

    one = pretrain.main(tiny_flags(tmp_path / "one", demo_data["pretrain"], steps=STEPS, batch_size=2,
                                   extra=["--accumulation_steps", "2"]))
    _close(state["model"], one["model"].state_dict())
    # the logged loss is the mean over both processes, equal to the one-process mean over both micro-batches
    two_losses = [line for line in (tmp_path / "two" / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert len(two_losses) == STEPS
    import json
    for line, (_, loss) in zip(two_losses, one["losses"]):
        assert abs(json.loads(line)["loss"] - loss) < 1e-4


def test_stopped_on_two_processes_resumes_on_one(demo_data, tmp_path):  # noqa: F811
    """2 processes x 1 micro-step for 2 steps, stop; resume on 1 process x 2 micro-steps: same as 1 process all along."""
    _torchrun(2, tiny_flags(tmp_path / "mixed", demo_data["pretrain"], steps=STEPS, batch_size=2,
                            extra=["--stop_after", "2"]), status=1)  # torchrun: a worker exited non-zero
    state = torch.load(tmp_path / "mixed" / "pretrain_64_resume.pt", weights_only=False)
    assert (state["step"], state["world_size"], state["finished"]) == (2, 2, False)  # stopped, not crashed
    resumed = pretrain.main(tiny_flags(tmp_path / "mixed", demo_data["pretrain"], steps=STEPS, batch_size=2,
                                       extra=["--accumulation_steps", "2", "--from_resume", "1"]))
    assert resumed["steps"] == STEPS
    one = pretrain.main(tiny_flags(tmp_path / "one", demo_data["pretrain"], steps=STEPS, batch_size=2,
                                   extra=["--accumulation_steps", "2"]))
    _close(one["model"].state_dict(), resumed["model"].state_dict())
