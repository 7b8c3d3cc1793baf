"""What a training run reports: the lines it prints at its start and end, the progress bar, and the metrics log.

At the start (train/engine.py, main process): one line on the data (minimind.data's Loader.stats() for this
process's epoch: records, tokens, padding, batches and everything else it counts) and one on the learning-rate
schedule. During the run: a progress bar with loss, lr, tokens/s and MFU, and one JSON record per logged step in
{out_dir}/{stage}_metrics.jsonl (and wandb with --use_wandb); `python -m train.plot` draws that log. At the end: where
the weights went and the final loss.
"""
import json
import os
import time
from pathlib import Path

import torch

from train import distributed
from train.checkpoint import atomic_write_text


def jsonable_flags(args) -> dict:
    """The flags whose values JSON can hold (the resume state and wandb's config keep them)."""
    return {k: v for k, v in vars(args).items() if v is None or isinstance(v, (bool, int, float, str))}


def _count(value):
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def data_summary(path, stats: dict, world_size: int = 1) -> str:
    """One line on the training data from Loader.stats(): records, tokens, padding and batches first, then every
    other entry it has ("dropped tokens 31", ...)."""
    s = dict(stats)
    kind, share = s.pop("kind", "?"), "" if world_size == 1 else f" (each of {world_size} processes)"
    parts = [f"{_count(s.pop('records', '?'))} records",
             f"{_count(s.pop('tokens', '?'))} tokens in {_count(s.pop('batches', '?'))} batches per epoch{share}"]
    if "padding_fraction" in s:
        parts.append(f"padding {100 * s.pop('padding_fraction'):.1f}% of {_count(s.pop('padded_tokens', '?'))} "
                     f"token slots")
    parts += [f"{name.replace('_', ' ')} {_count(value)}" for name, value in s.items()]
    return f"data {path} ({kind}): " + ", ".join(parts)


def schedule_summary(lr: float, warmup: int, total_steps: int) -> str:
    """MiniMind2's schedule in numbers, so the lr in the progress bar (1.1 x --learning_rate at the start) reads
    as intended."""
    warm = f"linear warmup over {warmup} steps, then " if warmup else ""
    return (f"lr schedule: {warm}MiniMind2's cosine lr/10 + lr/2 * (1 + cos(pi * step / {total_steps})) with "
            f"--learning_rate {lr:g}: from {1.1 * lr:.3g} (1.1x) down to {lr / 10:.3g} over {total_steps} steps")


def finish_summary(result: dict) -> str:
    """The line a finished stage ends with: steps, time, final loss, and where the weights and the log went."""
    return (f"{result['stage']} done: {result['steps']} steps in {result['seconds']:.1f}s "
            f"({result['tokens_per_s']:.0f} tokens/s), final loss {result['final_loss']:.4f}; weights -> "
            f"{result['weights_path']}, metrics log -> {result['metrics_path']}")


def progress_bar(total, initial, name, is_main):
    if not is_main:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)


def bar_text(record) -> str:
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    return f"loss {record['loss']:.4f} lr {record['lr']:.2e} tok/s {record['tokens_per_s']:.0f} mfu {mfu}"


def log_step(step, epoch, lr, loss, metric_sums, A, grad_norm, window, peak, W, dist, t_origin):
    """Average loss and metrics over the step's A micro-batches and the processes; throughput since the last log;
    elapsed_s = seconds of training since t_origin (which a resumed run moves back by its earlier runs' time).
    A window with "aside_s" (the RL stages' rollouts) keeps that time out of tokens/s and MFU and logs it as
    rollout_s (this process's seconds since the last log)."""
    names = sorted(metric_sums)
    values = [loss.float().reshape(())] + [torch.as_tensor(metric_sums[k], dtype=torch.float32,
                                                           device=loss.device).reshape(()) / A for k in names]
    means = distributed.all_reduce_mean(torch.stack(values), dist).tolist()
    counts = torch.tensor([window["tokens"], window["flops"]], dtype=torch.float64, device=loss.device)
    tokens, flops = (distributed.all_reduce_mean(counts, dist) * W).tolist()
    now = time.perf_counter()
    aside = window.get("aside_s")
    dt = max(now - window["t"] - (aside or 0.0), 1e-9)
    window.update(t=now, tokens=0, flops=0.0)
    record = dict(step=step, epoch=epoch, loss=means[0], lr=lr, tokens_per_s=tokens / dt,
                  mfu=(flops / dt / (peak * W)) if peak else None,
                  grad_norm=None if grad_norm is None else float(grad_norm), elapsed_s=now - t_origin)
    if aside is not None:
        record["rollout_s"], window["aside_s"] = aside, 0.0
    record.update(zip(names, means[1:]))
    return means[0], record


class MetricsLog:
    """{out_dir}/{stage}_metrics.jsonl, one JSON record per logged step, and optionally wandb.

    A fresh run (resume_step None) starts an empty log. A resumed run continues it from its checkpoint's step: the
    records of later steps are dropped first, since a run killed after its last checkpoint had logged steps that the
    resumed run does again (and a kill mid-write may have left a torn last line). So every step appears once."""

    def __init__(self, path, args, stage_name, enabled, resume_step=None):
        self.path, self.enabled, self.wandb = Path(path), enabled, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            self._keep_until(resume_step)
        if args.use_wandb:
            import wandb  # lazy: only with --use_wandb
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=args.wandb_project, name=f"{stage_name}-{args.save_weight}",
                                    config=jsonable_flags(args), mode=mode, dir=str(self.path.parent))

    def _keep_until(self, step):
        """Rewrite the log (atomically) with only its whole records of steps <= step."""
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
        atomic_write_text("".join(kept), self.path)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
