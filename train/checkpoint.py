"""Checkpoint files: atomic writes, MiniMind2 weight files (named, found, loaded strictly), resume checkpoints (found,
checked against the run) and the random-number state a resume needs.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed over the target
with os.replace (atomic on POSIX and Windows): a crash mid-save leaves the previous file intact, never a torn one.
A process killed mid-save (kill -9, power loss) cannot delete its temporary file; the next write of the same target
deletes it (`.{name}.tmp-{pid}` of a process that no longer exists).
"""
import glob
import os
import random
from pathlib import Path

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from minimind.config import MiniMindConfig
from minimind.model import MiniMindForCausalLM
from train.flags import ConfigError


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


# ---------------------------------------------------------------------- weight files and resume checkpoints

def weight_file_name(prefix: str, config: MiniMindConfig) -> str:
    return f"{prefix}_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth"


def is_weight_path(value: str) -> bool:
    """A --from_weight-style value names a file (ends in .pth/.pt or has a folder) rather than a stage prefix."""
    return value.endswith((".pth", ".pt")) or os.sep in value or "/" in value


def resolve_weights(name_or_path: str, out_dir, config: MiniMindConfig, flag="--from_weight") -> Optional[Path]:
    """'none' -> None; a stage prefix -> OUT_DIR/{prefix}_{hidden}[_moe].pth; else a path. The file must exist
    (the error names `flag`, the command-line flag the value came from)."""
    if name_or_path in (None, "", "none"):
        return None
    looks_like_path = is_weight_path(name_or_path)
    path = Path(name_or_path) if looks_like_path else Path(out_dir) / weight_file_name(name_or_path, config)
    if not path.is_file():
        raise ConfigError(f"{flag} {name_or_path}: no such file {path}"
                          + ("" if looks_like_path else " (run the stage that writes it first, or pass a path)"))
    return path


def _shape_of_state(sd):
    """(vocab, hidden, layers, moe, q/k norm) read off a MiniMind state dict."""
    emb = sd.get("model.embed_tokens.weight", sd.get("lm_head.weight"))
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")}
    moe = any(".mlp.experts." in k or ".mlp.w_gate" in k for k in sd)
    qk_norm = any(".self_attn.q_norm." in k for k in sd)
    return (None if emb is None else tuple(emb.shape)), len(layers), moe, qk_norm


def load_weights(model: nn.Module, source, name: str = "weights"):
    """Strict load of a state dict (or a .pth path) into model, with an error naming the file and the flag to fix."""
    sd = source
    if not isinstance(source, dict):
        name = str(source)
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"{name}: no such file") from None
        except Exception as e:
            raise ConfigError(f"{name}: not a readable checkpoint ({type(e).__name__}: {e})") from None
        if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]  # a resume checkpoint
    cfg = getattr(model, "config", None)
    if cfg is not None and isinstance(model, MiniMindForCausalLM):
        emb, layers, moe, qk_norm = _shape_of_state(sd)
        problems = []
        if emb is not None and emb[1] != cfg.hidden_size:
            problems.append(f"hidden_size {emb[1]} (model has --hidden_size {cfg.hidden_size})")
        if emb is not None and emb[0] != cfg.vocab_size:
            problems.append(f"vocab_size {emb[0]} (the tokenizer gives {cfg.vocab_size}; pass --tokenizer)")
        if layers != cfg.num_hidden_layers:
            problems.append(f"{layers} layers (model has --num_hidden_layers {cfg.num_hidden_layers})")
        if moe != cfg.use_moe:
            problems.append(f"use_moe {int(moe)} (model has --use_moe {int(cfg.use_moe)})")
        if qk_norm != cfg.qk_norm:
            problems.append(f"qk_norm {int(qk_norm)}, {'minimind-3' if qk_norm else 'MiniMind2'}'s q/k path "
                            f"(model has --qk_norm {int(cfg.qk_norm)}; --preset minimind3 / minimind3-moe have it)")
        if problems:
            raise ConfigError(f"{name} does not fit the model: it has " + ", ".join(problems))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{name} does not fit the model: {e}") from None
    return model


def resume_source(args, default_path):
    """The resume checkpoint to load: None for --from_resume 0, or 1 with nothing saved yet; a path given (that
    flags.check_args found) of the wrong kind (a DeepSpeed folder without --deepspeed, a .pt file with it) is an error."""
    if args.from_resume == "0":
        return None
    if args.from_resume == "1":
        return default_path if default_path.exists() else None
    path = Path(args.from_resume)
    if path.is_dir() != bool(args.deepspeed):
        raise ConfigError(f"--from_resume {path}: a DeepSpeed resume is a folder and needs --deepspeed; a plain one "
                          f"is a .pt file and does not" + (" (this is a folder)" if path.is_dir() else ""))
    return path


def check_resume(state, path, stage, args, config):
    if state.get("stage") != stage.name:
        raise ConfigError(f"--from_resume {path}: written by stage {state.get('stage')!r}, not {stage.name!r}")
    saved = MiniMindConfig.from_dict(state["config"])
    diff = [f"{k} {getattr(saved, k)} (now {getattr(config, k)})" for k in ("hidden_size", "num_hidden_layers",
            "use_moe", "vocab_size", "num_attention_heads", "num_key_value_heads") if getattr(saved, k) !=
            getattr(config, k)]
    if diff:
        raise ConfigError(f"--from_resume {path} was trained with " + ", ".join(diff))
    for flag in ("batch_size", "max_seq_len"):
        if state["args"][flag] != getattr(args, flag):
            raise ConfigError(f"--from_resume {path}: the data position counts batches of --{flag} "
                              f"{state['args'][flag]}, got --{flag} {getattr(args, flag)}")
