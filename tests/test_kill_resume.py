"""kill -9, not a polite stop: a process SIGKILLed at a fixed point (a hook counts checkpoint writes or cache blocks,
no wall-clock sleeps) leaves files that a resumed run turns into exactly the uninterrupted result: the same weights
bit for bit, each step once in the metrics log, no temporary file left behind."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.train_helpers import ROOT, demo_data, one_thread, run_module, tiny_flags  # noqa: F401  (fixtures)
from train import pretrain
from train.checkpoint import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs `train.pretrain ARGV` and SIGKILLs itself half-way through writing checkpoint file number KILL_AT (each save
# writes the weights, their config card, then the resume state).
KILLED_MID_WRITE = """
import io, os, signal, sys
import train.checkpoint as ck
KILL_AT, calls, atomic_write = int(sys.argv[1]), [0], ck._atomic_write
def hooked(path, mode, write):
    calls[0] += 1
    if calls[0] != KILL_AT:
        return atomic_write(path, mode, write)
    def half(f):
        buf = io.BytesIO()
        write(buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return atomic_write(path, mode, half)
ck._atomic_write = hooked
from train import pretrain
pretrain.main(sys.argv[2:])
"""


def test_killed_while_writing_a_checkpoint_resumes_exactly(demo_data, tmp_path):  # noqa: F811
    """Saves every 2 steps; SIGKILL half-way through the resume file of step 4 (write 6). The step-2 resume state
    must load, and the resumed run must end on the straight run's weights with steps 1..6 logged once each, even
    though the killed run had already logged steps 3 and 4 (and a torn line, as a crash mid-append would leave)."""
    common = ["--save_interval", "2", "--accumulation_steps", "2", "--warmup_iters", "2", "--from_weight", "none"]
    straight = pretrain.main(tiny_flags(tmp_path / "a", demo_data["pretrain"], steps=6, batch_size=2, seq=32,
                                        extra=common))

    out = tmp_path / "b"
    argv = tiny_flags(out, demo_data["pretrain"], steps=6, batch_size=2, seq=32, extra=common)
    killed = run_module(["-c", KILLED_MID_WRITE, "6", *argv])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list(out.glob(".pretrain_64_resume.pt.tmp-*"))) == 1  # what the kill left
    assert torch.load(out / "pretrain_64_resume.pt", weights_only=False)["step"] == 2
    metrics = out / "pretrain_metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 7.')

    resumed = pretrain.main([*argv, "--from_resume", "1"])
    assert resumed["steps"] == 6 and not resumed["interrupted"]
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [[r["step"], r["loss"]] for r in logged] == straight["losses"]
    assert not list(out.glob(".*.tmp-*"))


def test_a_write_removes_temporary_files_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".w.pth.tmp-{dead_pid}"
    live = tmp_path / f".w.pth.tmp-{os.getppid()}"  # our parent is running: its write may be under way
    other = tmp_path / f".v.pth.tmp-{dead_pid}"  # another target's: left for that target's next write
    for p in (stale, live, other):
        p.write_bytes(b"half a checkpoint")
    atomic_save({"x": torch.ones(2)}, tmp_path / "w.pth")
    assert not stale.exists() and live.exists() and other.exists()
    assert torch.equal(torch.load(tmp_path / "w.pth")["x"], torch.ones(2))


# Builds the token cache of ARGV[1] (kind sft) and SIGKILLs itself while tokenising its first block.
KILLED_CACHE_BUILD = """
import os, signal, sys
from minimind.data import cache
from minimind.tokenizer import load_tokenizer
cache.encode_block = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
cache.load_token_cache(sys.argv[1], "sft", load_tokenizer(), num_workers=0)
"""


def test_a_cache_build_killed_midway_is_rebuilt_and_cleaned_up(demo_data, tmp_path):  # noqa: F811
    import shutil

    from minimind.data import load_token_cache
    from minimind.tokenizer import load_tokenizer
    data = shutil.copy(demo_data["sft"], tmp_path / "sft.jsonl")
    killed = run_module(["-c", KILLED_CACHE_BUILD, str(data)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    caches = tmp_path / "sft.jsonl.tokcache"
    assert [p.suffix[:4] for p in caches.iterdir() if p.is_dir()] == [".tmp"]  # only the half-built folder
    cache = load_token_cache(data, "sft", load_tokenizer())
    assert len(cache) == sum(1 for _ in open(data))
    assert [p for p in caches.iterdir() if p.is_dir()] == [cache.folder]
