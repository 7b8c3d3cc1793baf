"""python -m train.plot: a PNG of loss, lr and tokens/s against steps from one or several metrics logs."""
import json
import re

import pytest

from train import plot

pytest.importorskip("matplotlib")  # the `plot` extra (in `dev`, so CI runs this)


def write_log(path, steps, torn=False):
    with open(path, "w", encoding="utf-8") as f:
        for s in steps:
            f.write(json.dumps(dict(step=s, loss=10.0 / s, lr=1e-3 * s, tokens_per_s=100.0 + s, mfu=None)) + "\n")
        if torn:
            f.write('{"step": 99, "lo')  # the last line of a run killed mid-write
    return path


def test_each_panel_has_a_line_per_run_with_its_records(tmp_path):
    a = write_log(tmp_path / "pretrain_metrics.jsonl", [1, 2, 3], torn=True)
    (tmp_path / "other").mkdir()
    b = write_log(tmp_path / "other" / "pretrain_metrics.jsonl", [2, 4])
    runs = [(plot.run_label(p, [a, b]), plot.read_metrics(p)) for p in (a, b)]
    assert [label for label, _ in runs] == [f"{tmp_path.name}/pretrain", "other/pretrain"]  # same file name twice
    fig = plot.draw(runs)
    for ax, (key, _) in zip(fig.axes, plot.PANELS):
        got = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
        want = [([r["step"] for r in records], [r[key] for r in records]) for _, records in runs]
        assert got == want, key
    assert plot.run_label(a, [a]) == "pretrain"


def test_command_line_writes_a_png_and_names_bad_input(tmp_path, capsys):
    logs = [write_log(tmp_path / f"{s}_metrics.jsonl", [1, 2, 3]) for s in ("pretrain", "sft")]
    out = plot.main([str(p) for p in logs])
    assert out == tmp_path / "metrics.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(out)
    assert plot.main([str(logs[0])]) == tmp_path / "pretrain_metrics.png"
    (tmp_path / "empty.jsonl").write_text("not json\n")
    for bad, message in ((tmp_path / "empty.jsonl", "empty.jsonl: no metrics records"),
                         (tmp_path / "nope.jsonl", "No such file or directory: .*nope.jsonl")):
        with pytest.raises(SystemExit) as e:
            plot.main([str(bad)])
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err)
