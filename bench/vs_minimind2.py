"""Side by side with MiniMind2's own trainer: the same run loss for loss, and the same step time for time (CPU).

    python -m bench.vs_minimind2 --minimind DIR [--mode parity|step|speed|all] [--out OUTDIR]

DIR is a checkout of MiniMind2 (jingyaogong/minimind at 561979c, April 2025, the MiniMind2 release). Its
trainer/train_pretrain.py runs unchanged, from DIR/trainer, in its own process; nothing of it is copied here. It
needs transformers (and imports pandas and scikit-learn, which its pretraining path never calls: when they are not
installed, empty stand-ins are put on its path). Ours runs as `python -m train.pretrain` with the switches that undo
our defaults (MINIMIND2_SWITCHES): --no_pack (one text per row, padded), --init minimind2 (its initial weights),
--shuffle 0 (file order, last partial batch kept), --seed 1337 (its seed), --tokenizer DIR/model.

Both run under a small instrument (`--instrument`, this file run as a script) that changes nothing they compute: a
global optimizer-step hook records the wall and CPU clock at every AdamW step, and torch.save keeps a copy of every
weight file written (both trainers overwrite one file).

Data: real text in pretrain_hq.jsonl's shape. Paragraphs of the MiniMind2 checkout's README.md (Chinese) and
README_en.md, of Python's own reference documentation (pydoc_data.topics, shipped with every Python) and of the
docstrings of its standard library's top-level modules, markdown and code stripped, cut into sentences; sentences are grouped into segments of at most SEGMENT_CHARS characters, three
segments to a line, each written <|im_start|>...<|im_end|>, separated by a space; the lines are shuffled once
(seed 0). The training file holds (steps - 1) * batch + batch / 2 lines (so the last batch is partial, which
MiniMind2 keeps); the held-out file the next --heldout lines.

Every mode first compares --init minimind2 with MiniMind2's model (imported from DIR/model) built under
torch.manual_seed(1337), dense and MoE, at the bench's model size: the state dicts must be bit-identical.

parity: 100 steps (--steps) of a small model (--hidden_size 256, 4 layers, --max_seq_len 128, batch 8), CPU, fp32,
lr 5e-4, no accumulation, grad clip 1, every step logged, weights saved every 20 steps. Compared: the loss MiniMind2
prints at each step (3 decimals) with ours at that step, and the held-out loss of every saved checkpoint (the fp16
weight files each trainer wrote, evaluated by one function: mean next-token cross-entropy over every non-pad target
of the held-out lines, one line per row, fp32) to 4 decimals.

step: MiniMind2's training step (its model, imported from DIR, under the lines of its training loop) and ours
(engine.train_step) in one process, alternating step by step on the same padded batch for --step_pairs pairs, so a
load change on the machine hits both alike; reported: the median of the per-pair ratios (CPU time and wall) and
their quartiles. This is the fine measure on a shared machine.

speed: --rounds rounds of one run of each trainer (--speed_steps steps on the first lines of the training file, no
saving, log every 100 steps as both default), in alternating order (ABBA...), so a load change on the machine hits
both. A run's step time is the median interval between consecutive optimizer steps after the first
--warmup_steps (data loading, forward, backward, clip, AdamW, logging: each trainer's whole loop); the round's ratio
is ours / MiniMind2's. Reported: every round's ratio (wall clock and process CPU time), their median and spread.
--threads N pins both to N torch threads, in every mode (1 makes CPU time a stable measure on a shared machine).
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINIMIND2_COMMIT = "561979c"
MINIMIND2_SEED = 1337  # trainer/train_pretrain.py: base_seed
SEGMENT_CHARS = 150
SEGMENTS_PER_LINE = 3
BOS, EOS = "<|im_start|>", "<|im_end|>"
# What turns our defaults into MiniMind2's run (README "Compared with MiniMind2's trainer").
MINIMIND2_SWITCHES = ["--no_pack", "--init", "minimind2", "--shuffle", "0", "--seed", str(MINIMIND2_SEED)]


# --------------------------------------------------------------------------------------------------- data

def _markdown_paragraphs(text):
    """A README's prose paragraphs (hard-wrapped lines joined, list items apart); code, html, tables left out."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)  # code blocks
    text = re.sub(r"<[^>]+>", " ", text)  # html
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images -> their text
    text = re.sub(r"\$[^$\n]*\$|https?://\S+|[*`_]{1,3}", " ", text)  # math, bare links, emphasis
    paragraphs, current = [], []
    for line in text.splitlines() + [""]:
        line = line.strip()
        starts_item = bool(re.match(r"([#>*+\-]|\d+\.)\s", line))
        if not line or line.startswith("|") or set(line) <= set("-=*#>|: ") or starts_item:
            if current:
                paragraphs.append(" ".join(current))
            current = []
            line = re.sub(r"^([#>*+\-]+|\d+\.)\s*", "", line) if starts_item else ""
        if line:
            current.append(line)
    return paragraphs


def _reference_paragraphs(text):
    """pydoc_data.topics: blank-line paragraphs; indented blocks (code, grammar) and underlines left out."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if lines and not lines[0].startswith(" ") and not set(lines[-1].strip()) <= set("*=-~^"):
            out.append(" ".join(l.strip() for l in lines))
    return out


def _docstring_paragraphs(path):
    """The prose paragraphs of a Python file's docstrings (module, classes, functions); code examples left out."""
    import ast
    import inspect
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            for block in re.split(r"\n\s*\n", inspect.cleandoc(doc or "")):
                lines = block.splitlines()
                if lines and not any(l.startswith((" ", ">>>", "...")) for l in lines):
                    out.append(" ".join(l.strip() for l in lines))
    return out


def source_paragraphs(minimind_dir):
    """The real text, as paragraphs: MiniMind2's two READMEs, Python's reference documentation, and the docstrings
    of Python's standard library modules (the top-level files of its Lib folder, in name order)."""
    import glob
    paragraphs = []
    for name in ("README.md", "README_en.md"):
        with open(os.path.join(minimind_dir, name), encoding="utf-8") as f:
            paragraphs += _markdown_paragraphs(f.read())
    from pydoc_data.topics import topics
    for key in sorted(topics):
        paragraphs += _reference_paragraphs(topics[key])
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        paragraphs += _docstring_paragraphs(path)
    return paragraphs


def pretrain_hq_lines(paragraphs, seed=0):
    """Lines in pretrain_hq.jsonl's shape: SEGMENTS_PER_LINE segments <|im_start|>...<|im_end|> joined by a space;
    a segment is consecutive sentences of one paragraph, at most SEGMENT_CHARS characters."""
    segments = []
    for p in paragraphs:
        current = ""
        for s in re.split(r"(?<=[。！？])|(?<=[.!?;])\s+", p):
            s = s.strip()
            if not s or len(s) > SEGMENT_CHARS:
                continue
            if current and len(current) + 1 + len(s) > SEGMENT_CHARS:
                segments.append(current)
                current = ""
            current = f"{current} {s}".strip() if current and s.isascii() else current + s
        if len(current) >= 20 and re.search(r"[\u4e00-\u9fff]|[A-Za-z]{3}", current):
            segments.append(current)
    lines = [" ".join(f"{BOS}{s}{EOS}" for s in segments[i:i + SEGMENTS_PER_LINE])
             for i in range(0, len(segments) - SEGMENTS_PER_LINE + 1, SEGMENTS_PER_LINE)]
    random.Random(seed).shuffle(lines)
    return lines


def write_jsonl(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    return path


def make_data(minimind_dir, folder, batch_size, steps, heldout):
    lines = pretrain_hq_lines(source_paragraphs(minimind_dir))
    n_train = (steps - 1) * batch_size + max(1, batch_size // 2)
    if n_train + heldout > len(lines):
        raise SystemExit(f"the text gives {len(lines)} lines, fewer than {n_train} + {heldout}; lower --steps, "
                         f"--batch_size or --heldout")
    return (write_jsonl(os.path.join(folder, "train.jsonl"), lines[:n_train]),
            write_jsonl(os.path.join(folder, "heldout.jsonl"), lines[n_train:n_train + heldout]))


# --------------------------------------------------------------------------------------------------- runs

def _instrument(record_dir, threads, argv):
    """Runs in the trainer's process: record every optimizer step's clocks and keep every weight file saved, then
    run the trainer (a script path, or -m module) as __main__."""
    import atexit
    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    if threads:
        torch.set_num_threads(threads)
    steps, weights = [], []
    register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.append((time.perf_counter(), time.process_time())))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and "lm_head.weight" in obj:  # a weight file, not a resume state
            path = os.path.join(record_dir, f"weights_step{len(steps):05d}.pth")
            real_save(obj, path)
            weights.append((len(steps), path))

    torch.save = save
    atexit.register(lambda: json.dump({"steps": steps, "weights": weights},
                                      open(os.path.join(record_dir, "record.json"), "w")))
    if argv[0] == "-m":  # as `python -m module` would: the working folder first on the path (not bench/)
        sys.argv, sys.path[0] = argv[1:], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # as `python script.py` would: the script's folder first
        sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def _stand_ins(folder):
    """Empty pandas / sklearn.model_selection for MiniMind2's dataset module when they are not installed."""
    import importlib.util
    missing = [m for m in ("pandas", "sklearn") if importlib.util.find_spec(m) is None]
    for m in missing:
        os.makedirs(os.path.join(folder, m), exist_ok=True)
        open(os.path.join(folder, m, "__init__.py"), "w").close()
    if "sklearn" in missing:
        with open(os.path.join(folder, "sklearn", "model_selection.py"), "w") as f:
            f.write("def train_test_split(*args, **kwargs):\n    raise NotImplementedError('stand-in')\n")
    return missing


def run_trainer(which, cfg, data, work, *, log_interval, save_interval, threads=None, minimind_dir=None,
                switches=tuple(MINIMIND2_SWITCHES)):
    """One training run of `which` ("minimind2" | "ours", the latter with `switches`) in its own process. Returns
    its record: steps [(wall, cpu)], weights [(step, path)], losses {step (1-based): printed loss string}."""
    record = tempfile.mkdtemp(prefix=f"{which}-", dir=work)
    common = ["--batch_size", cfg.batch_size, "--learning_rate", cfg.learning_rate, "--accumulation_steps", 1,
              "--grad_clip", 1.0, "--log_interval", log_interval, "--save_interval", save_interval,
              "--hidden_size", cfg.hidden_size, "--num_hidden_layers", cfg.num_hidden_layers,
              "--max_seq_len", cfg.max_seq_len, "--epochs", 1, "--data_path", data,
              "--out_dir", os.path.join(record, "out"), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if which == "minimind2":
        stand_ins = os.path.join(work, "stand_ins")
        if _stand_ins(stand_ins):
            env["PYTHONPATH"] = stand_ins
        argv, cwd = ["train_pretrain.py", *common, "--dtype", "float32"], os.path.join(minimind_dir, "trainer")
    else:
        env["PYTHONPATH"] = ROOT
        argv = ["-m", "train.pretrain", *common, "--dtype", "fp32", "--kernels", "torch",
                "--tokenizer", os.path.join(minimind_dir, "model"), *switches]
        cwd = ROOT
    cmd = [sys.executable, os.path.abspath(__file__), "--instrument", record, "--threads", str(threads or 0),
           "--", *map(str, argv)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    for name, text in (("stdout.txt", proc.stdout), ("stderr.txt", proc.stderr)):
        with open(os.path.join(record, name), "w", encoding="utf-8") as f:
            f.write(text)
    if proc.returncode:
        raise RuntimeError(f"{which} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(record, "record.json")) as f:
        rec = json.load(f)
    rec["seconds"] = time.perf_counter() - t0
    if which == "minimind2":  # "Epoch:[1/1](k/N) loss:X.XXX lr:..." at 0-based step k
        rec["losses"] = {int(k) + 1: v for k, v in re.findall(r"\]\((\d+)/\d+\) loss:(\d+\.\d+)", proc.stdout)}
    else:
        with open(os.path.join(record, "out", "pretrain_metrics.jsonl")) as f:
            rec["exact_losses"] = {r["step"]: r["loss"] for r in map(json.loads, f)}
        rec["losses"] = {step: f"{loss:.3f}" for step, loss in rec["exact_losses"].items()}
    return rec


def heldout_loss(weights_path, heldout, tokenizer_dir, cfg):
    """Mean next-token cross-entropy over every non-pad target of the held-out lines (one line per row, padded to
    max_seq_len, as MiniMind2 lays them out), fp32, our torch backend."""
    import torch

    from minimind.config import MiniMindConfig
    from minimind.data import build_loader
    from minimind.model import MiniMindForCausalLM, shift_labels
    from minimind.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                                               vocab_size=tok.vocab_size), kernels="torch")
    sd = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.eval()
    loader = build_loader("pretrain", heldout, tok, max_seq_len=cfg.max_seq_len, batch_size=16, pack=False,
                          shuffle=False, drop_last=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            n = int((shift_labels(batch["labels"]) != -100).sum())
            total += float(model(batch["input_ids"], labels=batch["labels"]).lm_loss) * n
            count += n
    return total / count


# --------------------------------------------------------------------------------------------------- reports

# ours with one of MiniMind2's switches left out: what each of our defaults changes (parity --ablations)
ABLATIONS = {"ours, our init (no --init minimind2)": ("--init", "minimind2"),
             "ours, shuffled (no --shuffle 0)": ("--shuffle", "0")}


def _without(switches, pair):
    i = switches.index(pair[0])
    return switches[:i] + switches[i + len(pair):]


def parity(cfg, minimind_dir, work):
    """Both trainers on the same file (see the module docstring): per-step losses, held-out loss per checkpoint."""
    train, heldout = make_data(minimind_dir, work, cfg.batch_size, cfg.steps, cfg.heldout)
    tokenizer = os.path.join(minimind_dir, "model")
    kw = dict(log_interval=1, save_interval=cfg.save_interval, threads=cfg.threads, minimind_dir=minimind_dir)
    theirs, ours = (run_trainer(w, cfg, train, work, **kw) for w in ("minimind2", "ours"))
    steps = sorted(theirs["losses"])
    per_step = [{"step": s, "minimind2": theirs["losses"][s], "ours": ours["losses"].get(s),
                 "ours_exact": ours["exact_losses"].get(s)} for s in steps]
    checkpoints = []
    ours_weights = dict(ours["weights"])
    for step, path in theirs["weights"]:
        row = {"step": step, "minimind2": heldout_loss(path, heldout, tokenizer, cfg)}
        if step in ours_weights:
            row["ours"] = heldout_loss(ours_weights[step], heldout, tokenizer, cfg)
            row["abs_diff"] = abs(row["ours"] - row["minimind2"])
        checkpoints.append(row)
    ablations = []
    for name, pair in (ABLATIONS.items() if cfg.ablations else ()):
        rec = run_trainer("ours", cfg, train, work, switches=_without(MINIMIND2_SWITCHES, pair), **kw)
        step, path = rec["weights"][-1]
        ablations.append({"run": name, "steps": step, "heldout": heldout_loss(path, heldout, tokenizer, cfg)})
    gaps = [abs(r["ours_exact"] - float(r["minimind2"])) if r["ours_exact"] is not None else float("inf")
            for r in per_step]
    return {"steps_minimind2": len(theirs["steps"]), "steps_ours": len(ours["steps"]), "per_step": per_step,
            "steps_equal_at_3_decimals": sum(r["minimind2"] == r["ours"] for r in per_step),
            "max_abs_diff_to_printed": max(gaps, default=float("nan")),
            "checkpoints": checkpoints,
            "checkpoints_equal_at_4_decimals": sum(f"{r['minimind2']:.4f}" == f"{r.get('ours', float('nan')):.4f}"
                                                   for r in checkpoints),
            "checkpoint_steps_ours": sorted(ours_weights), "ablations": ablations,
            "train_lines": cfg.batch_size * (cfg.steps - 1) + max(1, cfg.batch_size // 2), "heldout_lines": cfg.heldout}


def init_check(cfg, minimind_dir):
    """--init minimind2 against MiniMind2's own model: MiniMind2's MiniMindForCausalLM built right after
    torch.manual_seed(MINIMIND2_SEED) (as its trainer does), dense and MoE, and ours after init_minimind2_ with that
    seed. Returns per model: the tensors compared and the names of those that are not bit-identical."""
    import torch

    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM
    sys.path.insert(0, minimind_dir)
    from model.model_minimind import MiniMindConfig as MiniMind2Config, MiniMindForCausalLM as MiniMind2Model
    out = {}
    for name, moe in (("dense", False), ("moe", True)):
        shape = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers, use_moe=moe)
        torch.manual_seed(MINIMIND2_SEED)
        theirs = MiniMind2Model(MiniMind2Config(**shape)).state_dict()
        ours = MiniMindForCausalLM(MiniMindConfig(**shape)).init_minimind2_(MINIMIND2_SEED).state_dict()
        if set(theirs) != set(ours):
            raise RuntimeError(f"{name}: the two state dicts name different tensors: {sorted(set(theirs) ^ set(ours))}")
        out[name] = {"tensors": len(theirs), "differ": [k for k in theirs if not torch.equal(theirs[k], ours[k])]}
    return out


def _step_time(rec, warmup, clock):
    t = [s[clock] for s in rec["steps"]][warmup:]
    return statistics.median(b - a for a, b in zip(t, t[1:]))


def speed(cfg, minimind_dir, work):
    n_lines = cfg.speed_steps * cfg.batch_size
    train = os.path.join(work, "train.jsonl")
    if not os.path.exists(train):
        train, _ = make_data(minimind_dir, work, cfg.batch_size, cfg.speed_steps + 1, 0)
    with open(train, encoding="utf-8") as f:
        lines = [json.loads(l)["text"] for l in f][:n_lines]
    data = write_jsonl(os.path.join(work, "speed.jsonl"), lines)
    rounds = []
    for r in range(cfg.rounds):
        order = ("minimind2", "ours") if r % 2 == 0 else ("ours", "minimind2")
        recs = {w: run_trainer(w, cfg, data, work, log_interval=100, save_interval=10 ** 9, threads=cfg.threads,
                               minimind_dir=minimind_dir) for w in order}
        row = {"round": r, "first": order[0]}
        for w, rec in recs.items():
            row[f"{w}_wall_s"] = _step_time(rec, cfg.warmup_steps, 0)
            row[f"{w}_cpu_s"] = _step_time(rec, cfg.warmup_steps, 1)
        row["ratio_wall"] = row["ours_wall_s"] / row["minimind2_wall_s"]
        row["ratio_cpu"] = row["ours_cpu_s"] / row["minimind2_cpu_s"]
        rounds.append(row)
        print(f"  round {r}: ours {row['ours_wall_s'] * 1e3:.0f} ms / MiniMind2 {row['minimind2_wall_s'] * 1e3:.0f} "
              f"ms per step = {row['ratio_wall']:.3f} (CPU time {row['ratio_cpu']:.3f})", flush=True)
    out = {"rounds": rounds, "threads": cfg.threads or "torch default"}
    for clock in ("wall", "cpu"):
        ratios = [r[f"ratio_{clock}"] for r in rounds]
        out[f"ratio_{clock}_median"] = statistics.median(ratios)
        out[f"ratio_{clock}_min"], out[f"ratio_{clock}_max"] = min(ratios), max(ratios)
    return out


def step_speed(cfg, minimind_dir, work):
    """MiniMind2's training step and ours in this one process, alternating step by step on the same padded batch
    (the first --batch_size lines of the training text), so both see the same machine. MiniMind2's step is its
    model (imported from DIR/model) under the lines of its train_epoch: logits, cross-entropy with reduction none
    times the pad mask over the mask's sum, plus aux loss, backward, clip_grad_norm_ 1.0, AdamW (torch's defaults),
    zero_grad. Ours is engine.train_step on pretrain.lm_loss under --no_pack (what the engine's loop calls; each
    row goes in without its last token, as MiniMind2's X = ids[:-1]). Both models start from the same weights
    (--init minimind2). Returns the median times and the median of the per-pair ratios."""
    import torch
    import torch.nn.functional as F

    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import load_tokenizer
    from train import engine, pretrain
    from train.distributed import Dist
    from types import SimpleNamespace
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sys.path.insert(0, minimind_dir)
    from model.model_minimind import MiniMindConfig as MiniMind2Config, MiniMindForCausalLM as MiniMind2Model
    train = os.path.join(work, "train.jsonl")
    if not os.path.exists(train):
        train, _ = make_data(minimind_dir, work, cfg.batch_size, 2, 0)
    tok = load_tokenizer(os.path.join(minimind_dir, "model"))
    with open(train, encoding="utf-8") as f:
        texts = [json.loads(next(f))["text"] for _ in range(cfg.batch_size)]
    T = cfg.max_seq_len
    ids = torch.tensor([(tok.encode(t)[:T] + [tok.pad_id] * T)[:T] for t in texts])
    X, Y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    loss_mask = (Y != tok.pad_id).long()

    torch.manual_seed(MINIMIND2_SEED)
    theirs = MiniMind2Model(MiniMind2Config(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers))
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=cfg.learning_rate)

    def their_step():
        res = theirs(X)
        loss = F.cross_entropy(res.logits.view(-1, res.logits.size(-1)), Y.view(-1), reduction="none").view(Y.size())
        loss = (loss * loss_mask).sum() / loss_mask.sum() + res.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        return loss

    config = MiniMindConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                            vocab_size=tok.vocab_size)
    ours = MiniMindForCausalLM(config, kernels="torch").init_minimind2_(MINIMIND2_SEED)
    params = list(ours.parameters())
    our_opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    run = engine.Run(SimpleNamespace(kernels="torch", attn="sdpa", out_dir=work, no_pack=True), config, tok, torch.device("cpu"),
                     torch.float32, Dist())
    step_module = engine.StageStep(ours, pretrain.lm_loss, run)
    labels = ids.masked_fill(ids == tok.pad_id, -100)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (ids != tok.pad_id).long()}

    def our_step():
        return engine.train_step(step_module, [batch], our_opt, params, cfg.learning_rate, grad_clip=1.0)[0]

    times, first = {"minimind2": [], "ours": []}, {}
    for i in range(cfg.warmup_steps + cfg.step_pairs):
        order = (("minimind2", their_step), ("ours", our_step))
        for name, step in (order if i % 2 == 0 else order[::-1]):
            w, c = time.perf_counter(), time.process_time()
            loss = step()
            first.setdefault(name, float(loss.detach()))  # the same weights and batch: the same first loss
            if i >= cfg.warmup_steps:
                times[name].append((time.perf_counter() - w, time.process_time() - c))
    out = {"pairs": cfg.step_pairs, "threads": cfg.threads or "torch default",
           "pad_fraction": float(1 - loss_mask.float().mean()), "first_loss": first}
    for k, clock in enumerate(("wall", "cpu")):
        for name in times:
            out[f"{name}_{clock}_s"] = statistics.median(t[k] for t in times[name])
        ratios = sorted(o[k] / m[k] for o, m in zip(times["ours"], times["minimind2"]))
        out[f"ratio_{clock}_median"] = statistics.median(ratios)
        out[f"ratio_{clock}_quartiles"] = (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
    print(f"  step: ours {out['ours_cpu_s'] * 1e3:.0f} ms / MiniMind2 {out['minimind2_cpu_s'] * 1e3:.0f} ms CPU per "
          f"step, median pair ratio {out['ratio_cpu_median']:.3f}", flush=True)
    return out


def markdown(doc):
    from bench import report
    c = doc["config"]
    lines = ["## Side by side with MiniMind2's trainer (CPU, fp32)", "", report.env_line(doc["env"]), "",
             f"Model hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, seq {c['max_seq_len']}, batch "
             f"{c['batch_size']}, lr {c['learning_rate']}; MiniMind2 at {MINIMIND2_COMMIT}; ours with "
             f"`{' '.join(MINIMIND2_SWITCHES)}`.", ""]
    lines += ["`--init minimind2` against MiniMind2's model built under torch.manual_seed(1337): " + "; ".join(
        f"{name} {len(r['differ']) or 'all'} of {r['tensors']} tensors {'differ' if r['differ'] else 'bit-identical'}"
        for name, r in doc["init"].items()) + ".", ""]
    p = doc.get("parity")
    if p:
        n, f4 = len(p["per_step"]), (lambda key: lambda r: f"{r[key]:.4f}" if key in r else "-")
        lines += [f"Per-step loss (as MiniMind2 prints it, 3 decimals): {p['steps_equal_at_3_decimals']} of {n} "
                  f"steps equal; largest |ours - MiniMind2's printed value| {p['max_abs_diff_to_printed']:.5f}. "
                  f"Held-out loss of the saved weights: {p['checkpoints_equal_at_4_decimals']} of "
                  f"{len(p['checkpoints'])} checkpoints equal to 4 decimals.", "",
                  report.markdown_table(p["checkpoints"], [("step", "step"), ("MiniMind2 held-out", f4("minimind2")),
                                                           ("ours held-out", f4("ours")),
                                                           ("abs diff", lambda r: f"{r['abs_diff']:.1e}")]), ""]
        if p["ablations"]:
            lines += ["Ours with one switch left out (held-out loss of its last weights):", "",
                      report.markdown_table(p["ablations"], [("run", "run"), ("steps", "steps"),
                                                             ("held-out", f4("heldout"))]), ""]
    s = doc.get("step")
    if s:
        lines += [f"One training step in one process, alternating ({s['pairs']} pairs, {s['threads']} threads, pad "
                  f"fraction {s['pad_fraction']:.2f}): MiniMind2 {s['minimind2_cpu_s'] * 1e3:.0f} ms, ours "
                  f"{s['ours_cpu_s'] * 1e3:.0f} ms CPU time; ours / MiniMind2 per pair: CPU time median "
                  f"{s['ratio_cpu_median']:.3f} (quartiles {s['ratio_cpu_quartiles'][0]:.3f}-"
                  f"{s['ratio_cpu_quartiles'][1]:.3f}), wall median {s['ratio_wall_median']:.3f} (quartiles "
                  f"{s['ratio_wall_quartiles'][0]:.3f}-{s['ratio_wall_quartiles'][1]:.3f}). First losses (same "
                  f"weights, same batch): MiniMind2 {s['first_loss']['minimind2']:.6f}, ours "
                  f"{s['first_loss']['ours']:.6f}.", ""]
    s = doc.get("speed")
    if s:
        lines += [f"Step time, ours / MiniMind2, {len(s['rounds'])} interleaved rounds ({s['threads']} threads): "
                  f"wall median {s['ratio_wall_median']:.3f} (range {s['ratio_wall_min']:.3f}-"
                  f"{s['ratio_wall_max']:.3f}), CPU time median {s['ratio_cpu_median']:.3f} (range "
                  f"{s['ratio_cpu_min']:.3f}-{s['ratio_cpu_max']:.3f}).", "",
                  report.markdown_table(s["rounds"], [("round", "round"), ("first", "first"),
                                                      ("MiniMind2 ms", lambda r: r["minimind2_wall_s"] * 1e3),
                                                      ("ours ms", lambda r: r["ours_wall_s"] * 1e3),
                                                      ("wall ratio", "ratio_wall"), ("CPU ratio", "ratio_cpu")])]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Our trainer beside MiniMind2's own, on the CPU: losses and step time.")
    p.add_argument("--minimind", required=True, help=f"a MiniMind2 checkout (jingyaogong/minimind {MINIMIND2_COMMIT})")
    p.add_argument("--mode", default="all", choices=("parity", "speed", "step", "all"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--max_seq_len", type=int, default=128)
    p.add_argument("--save_interval", type=int, default=20)
    p.add_argument("--heldout", type=int, default=64, help="held-out lines")
    p.add_argument("--ablations", action="store_true",
                   help="parity: also run ours without --init minimind2, and without --shuffle 0")
    p.add_argument("--rounds", type=int, default=6, help="speed: runs of each trainer, interleaved")
    p.add_argument("--speed_steps", type=int, default=40)
    p.add_argument("--warmup_steps", type=int, default=5)
    p.add_argument("--step_pairs", type=int, default=30, help="step: timed pairs of steps, alternating")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of both trainers (default torch's; 1 keeps a shared machine's noise down)")
    p.add_argument("--work", default=None, help="keep the runs' files here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="folder for vs_minimind2.json and vs_minimind2.md")
    cfg = p.parse_args(argv)
    if not os.path.isfile(os.path.join(cfg.minimind, "trainer", "train_pretrain.py")):
        p.error(f"--minimind {cfg.minimind}: no trainer/train_pretrain.py (a MiniMind2 checkout, {MINIMIND2_COMMIT})")
    from bench import report
    cfg.minimind = os.path.abspath(cfg.minimind)
    doc = {"kind": "vs_minimind2", "env": report.environment(label="CPU, fp32"), "config": vars(cfg)}
    with tempfile.TemporaryDirectory(prefix="vs_minimind2-") as tmp:
        work = cfg.work or tmp
        os.makedirs(work, exist_ok=True)
        doc["init"] = init_check(cfg, cfg.minimind)
        if cfg.mode in ("parity", "all"):
            doc["parity"] = parity(cfg, cfg.minimind, work)
        if cfg.mode in ("step", "all"):
            doc["step"] = step_speed(cfg, cfg.minimind, work)
        if cfg.mode in ("speed", "all"):
            doc["speed"] = speed(cfg, cfg.minimind, work)
    text = markdown(doc)
    print(text)
    if cfg.out:
        report.write_json(os.path.join(cfg.out, "vs_minimind2.json"), doc)
        report.write_text(os.path.join(cfg.out, "vs_minimind2.md"), text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--instrument":  # python bench/vs_minimind2.py --instrument DIR ...
        sep = sys.argv.index("--")
        _instrument(sys.argv[2], int(sys.argv[4]), sys.argv[sep + 1:])
    else:
        sys.exit(main())
