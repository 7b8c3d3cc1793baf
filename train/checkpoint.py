"""Checkpoint files: atomic writes, MiniMind2 weight files, and the random-number state a resume needs.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over the target
with os.replace (atomic on POSIX and Windows): a crash mid-save leaves the previous file intact, never a torn one.
A process killed mid-save (kill -9, power loss) cannot delete its temporary file; the next write of the same target
deletes it (`.{name}.tmp-{pid}` of a process that no longer exists).
"""
import glob
import os
import random
from pathlib import Path

import numpy as np
import torch


def _atomic_write(path, mode, write):
    """write(f) into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder: a crash at
    any moment leaves either the old file or the new one, never a torn one. Returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _remove_stale_temps(path):
    """Delete the temporary files of `path` (`.{name}.tmp-{pid}`) left by processes that no longer exist, i.e. were
    killed mid-write. A live process's file (another pid, still running) is left alone."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid):
    if os.name == "nt":  # os.kill there terminates the process instead of asking: keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (PermissionError), or cannot be asked: keep its file
        return True
    return True


def atomic_save(obj, path):
    """torch.save(obj) to `path` atomically. Returns the Path."""
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    """Write a small text file atomically (same scheme as atomic_save)."""
    return _atomic_write(path, "w", lambda f: f.write(text))


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fp16_state_dict(model):
    """The model's state dict as MiniMind2 stores it: every floating tensor in fp16, on the CPU."""
    return {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}


def rng_state():
    """Every random-number generator a training step can touch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
