"""A picture of training: loss, learning rate and tokens/s against the optimizer step, for one run or several.

    python -m train.plot out/pretrain_metrics.jsonl                  # -> out/pretrain_metrics.png
    python -m train.plot out/*_metrics.jsonl --out out/runs.png      # every stage of a run, one line each

Reads the metrics logs every stage writes ({out_dir}/{stage}_metrics.jsonl, one JSON record per logged step) and
draws three panels sharing the step axis. A line that is not a JSON record (the torn last line of a killed run) is
skipped. Needs matplotlib: pip install -e '.[plot]'.
"""
import argparse
import json
import sys
from pathlib import Path

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))  # record key, axis label


def read_metrics(path) -> list:
    """The records of one metrics log (dicts with at least "step"), in file order."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    if not records:
        raise ValueError(f"{path}: no metrics records (is it a {{stage}}_metrics.jsonl file?)")
    return records


def run_label(path, paths) -> str:
    """'pretrain' for out/pretrain_metrics.jsonl; with the folder when two runs would get the same name."""
    path = Path(path)
    name = path.stem.removesuffix("_metrics")
    if sum(Path(p).stem == path.stem for p in paths) > 1:
        return f"{path.parent.name}/{name}"
    return name


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("train.plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")  # a file, no window
    import matplotlib.pyplot as plt
    return plt


def draw(runs):
    """A matplotlib figure: one panel per PANELS entry, one line per (label, records) run."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.6 * len(PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        for label, records in runs:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def plot_runs(paths, out) -> Path:
    """Write a PNG of loss, lr and tokens/s against steps for the metrics logs `paths` to `out`; returns out."""
    fig = draw([(run_label(p, paths), read_metrics(p)) for p in paths])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def default_out(paths) -> Path:
    first = Path(paths[0])
    return first.with_suffix(".png") if len(paths) == 1 else first.parent / "metrics.png"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="+", help="metrics logs ({out_dir}/{stage}_metrics.jsonl), one line each")
    p.add_argument("--out", default=None,
                   help="the PNG to write (default: beside the log, FILE.png; for several logs, metrics.png beside "
                        "the first)")
    args = p.parse_args(argv)
    try:
        out = plot_runs(args.metrics, args.out or default_out(args.metrics))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"python -m train.plot: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)
    return out


if __name__ == "__main__":
    main()
