"""DeepSpeed ZeRO-1/2 under the engine: the JSON config filled from our flags, initialisation, resume state.

The shipped configs (train/configs/ds_zero{1,2}.json) leave batch sizes, accumulation, clipping and precision as
"auto"; they are filled from --batch_size, --accumulation_steps, --grad_clip and --dtype. An explicit value that
contradicts a flag is an error, not a silent override. The optimizer stays the engine's AdamW (DeepSpeed shards
its state), and the engine sets its learning rate each step.

Resume state is DeepSpeed's own sharded checkpoint (every process writes its part) in a folder; the folder's
`latest` file names the complete tag and is replaced atomically only after every process has finished writing,
so a crash mid-save leaves the previous tag in force. A run resumed on another number of processes first converts
that tag to DeepSpeed's universal checkpoint format (ZeRO's optimizer state unpartitioned), then loads it.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from train import distributed
from train.checkpoint import atomic_write_text


def filled_config(path, args, world_size) -> dict:
    """The DeepSpeed config at `path` with every "auto" replaced by the value our flags give."""
    from train.engine import ConfigError
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed {path}: {e}") from None
    want = {
        "train_micro_batch_size_per_gpu": (args.batch_size, "--batch_size"),
        "gradient_accumulation_steps": (args.accumulation_steps, "--accumulation_steps"),
        "train_batch_size": (args.batch_size * args.accumulation_steps * world_size,
                             "--batch_size x --accumulation_steps x processes"),
        "gradient_clipping": (args.grad_clip, "--grad_clip"),
    }
    for key, (value, flag) in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise ConfigError(f"--deepspeed {path}: {key} is {have} but {flag} gives {value}; set it to \"auto\"")
        cfg[key] = value
    for key, on in (("bf16", args.dtype in ("bf16", "bfloat16")), ("fp16", args.dtype in ("fp16", "float16"))):
        section = cfg.setdefault(key, {})
        if section.get("enabled", "auto") not in ("auto", on):
            raise ConfigError(f"--deepspeed {path}: {key}.enabled is {section['enabled']} but --dtype is {args.dtype}")
        section["enabled"] = on
    cfg["zero_allow_untested_optimizer"] = True  # the engine's torch AdamW
    return cfg


def initialize(step_module, trainable, optimizer, args, dist, resume_from=None):
    """Wrap the engine's step module and optimizer in a DeepSpeed engine. Returns (engine, wrapped optimizer).
    resume_from: the resume folder about to be loaded; saved by another number of processes, it is first converted
    to DeepSpeed's universal format (`_universal_tag`), which the engine is then told to load."""
    import deepspeed
    config = filled_config(args.deepspeed, args, dist.world_size)
    if resume_from is not None and _latest(resume_from)["world_size"] != dist.world_size:
        _universal_tag(Path(resume_from), dist)
        config.setdefault("checkpoint", {})["load_universal"] = True
    if args.grad_clip > 0 and len(trainable) > 1 and isinstance(trainable[0], dict) and dist.is_main:
        print(f"--deepspeed: DeepSpeed clips the norm of all {len(trainable)} parameter groups together to "
              f"--grad_clip {args.grad_clip}, not each group on its own as the engine does without it (PPO's actor "
              "and critic)")
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=step_module, model_parameters=trainable,
                                                      optimizer=optimizer, config=config)
    return engine, ds_optimizer


def _latest(folder) -> dict:
    from train.engine import ConfigError
    try:
        return json.loads((Path(folder) / "latest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--from_resume {folder}: not a DeepSpeed resume folder ({e})") from None


def _universal_tag(folder, dist) -> str:
    """Convert the tag `latest` names to {tag}_universal (ZeRO's optimizer state unpartitioned, so any number of
    processes can load it; deepspeed.checkpoint.ds_to_universal, run once by process 0). Returns the new tag."""
    from train.engine import ConfigError
    tag = _latest(folder)["tag"]
    out = folder / f"{tag}_universal"
    if dist.is_main and not out.is_dir():
        tmp = folder / f"{tag}_universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(folder / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                            "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"--from_resume {folder}: converting {tag} for another number of processes failed:\n"
                              + r.stderr[-2000:])
        tmp.rename(out)  # complete or absent
    distributed.barrier(dist)
    return out.name


def save_resume(engine, folder, state, dist):
    """Every process writes its shard under tag step{N} (step{N}_{ns} if that exists: a re-save never writes into
    the tag `latest` names); then `latest` flips to it and older tags are removed."""
    folder = Path(folder)
    tag = [f"step{state['step']}"]
    if dist.is_main and (folder / tag[0]).exists():  # never overwrite the tag `latest` may name (a re-save)
        tag[0] += f"_{time.time_ns()}"
    if dist.enabled:
        torch.distributed.broadcast_object_list(tag, src=0)  # every process writes its part under one tag
    tag = tag[0]
    engine.save_checkpoint(str(folder), tag=tag, save_latest=False,  # (the info lets ds_to_universal convert it)
                           client_state={"engine_state": state, "universal_checkpoint_info": {}})
    distributed.barrier(dist)
    if dist.is_main:
        atomic_write_text(json.dumps({"tag": tag, "world_size": dist.world_size}), folder / "latest.json")
        for old in folder.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(dist)


def load_resume(engine, folder, dist) -> dict:
    """Load the tag `latest.json` names (its universal conversion when it was saved by another number of
    processes; see initialize); returns the engine state saved with it."""
    from train.engine import ConfigError
    folder = Path(folder)
    latest = _latest(folder)
    tag = latest["tag"] if latest["world_size"] == dist.world_size else f"{latest['tag']}_universal"
    path, client = engine.load_checkpoint(str(folder), tag=tag)
    if path is None:
        raise ConfigError(f"--from_resume {folder}: DeepSpeed could not load tag {tag}")
    return client["engine_state"]
