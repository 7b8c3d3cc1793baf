"""Multiple-choice benchmarks (C-Eval, CMMLU and the like) on a weight file, MoE models included; and, with
--toolcall, the tool-call eval (minimind/toolcall_eval.py: tasks solved with mock tools, scored for valid calls and
the right final answer; a minimind-3 tokenizer).

    python -m minimind.evaluate full_sft --data ceval/val/            # every .csv / .jsonl in the folder
    python -m minimind.evaluate out/full_sft_512.pth --data cmmlu/test/anatomy.csv --template chat
    python -m minimind.evaluate full_sft --toolcall                   # the bundled tasks and mock tools
    python -m minimind.evaluate full_sft --toolcall --tasks my_tasks.jsonl --tools my_tools.py --think on

Each item is a question with four options A-D and the letter of the right one. Files: CSV with a header (C-Eval:
id,question,A,B,C,D,answer; CMMLU: ,Question,A,B,C,D,Answer; column names are matched without case) or JSON
Lines with the same fields. The prompt is lm-evaluation-harness's zero-shot C-Eval one,

    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

(inside MiniMind2's chat template as the user turn with --template chat, for SFT models), and the model's answer
is the letter among A, B, C, D with the highest next-token probability: each letter is one token, so this is the
harness's log-likelihood choice. Accuracy per file (a subject) and overall; chance is 25%.

    evaluate(model, tokenizer, items, template="plain", batch_size=16) -> (predicted letters, accuracy)
"""
import argparse
import csv
import json
from pathlib import Path
from typing import List, Tuple

import torch

from minimind.generate import left_pad

LETTERS = "ABCD"
FIELDS = ("question", "A", "B", "C", "D", "answer")


def _item(row: dict, where: str) -> dict:
    by_name = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    missing = [f for f in FIELDS if f.lower() not in by_name]
    if missing:
        raise ValueError(f"{where}: no {missing} (columns are {sorted(by_name)})")
    item = {f: str(by_name[f.lower()]).strip() for f in FIELDS}
    if item["answer"] not in LETTERS:
        raise ValueError(f"{where}: answer {item['answer']!r} is not one of A, B, C, D")
    return item


def load_items(path) -> List[dict]:
    """The items of one .csv or .jsonl file; errors name the file and the line."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [_item(row, f"{path}:{i}") for i, row in enumerate(csv.DictReader(f), start=2)]
    if path.suffix == ".jsonl":
        items = []
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        items.append(_item(json.loads(line), f"{path}:{i}"))
                    except (json.JSONDecodeError, AttributeError) as e:
                        raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
        return items
    raise ValueError(f"{path}: expected a .csv or .jsonl file")


def prompt_text(item: dict, template: str, tokenizer) -> str:
    text = item["question"] + "".join(f"\n{x}. {item[x]}" for x in LETTERS) + "\n答案："
    if template == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return text


@torch.no_grad()
def evaluate(model, tokenizer, items: List[dict], template: str = "plain", batch_size: int = 16) \
        -> Tuple[List[str], float]:
    """The letter the model picks for each item, and the accuracy."""
    letter_ids = [tokenizer.encode(x) for x in LETTERS]
    if any(len(ids) != 1 for ids in letter_ids):
        raise ValueError(f"the tokenizer splits a letter A-D into several tokens: {letter_ids}")
    letter_ids = torch.tensor([ids[0] for ids in letter_ids])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    picks = []
    try:
        for start in range(0, len(items), batch_size):
            prompts = [tokenizer.encode(prompt_text(it, template, tokenizer)) for it in items[start:start + batch_size]]
            ids, mask = left_pad(prompts, tokenizer.pad_id, device)
            logits = model(ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float()
            picks += [LETTERS[i] for i in logits[:, letter_ids.to(device)].argmax(dim=-1).tolist()]
    finally:
        model.train(was_training)
    right = sum(p == it["answer"] for p, it in zip(picks, items))
    return picks, right / max(len(items), 1)


def main(argv=None):
    from minimind.chat import add_model_args, add_sampling_args, number_at_least, open_model
    p = argparse.ArgumentParser(prog="python -m minimind.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", default=None, help="a .csv / .jsonl file, or a folder of them (one per subject)")
    p.add_argument("--template", choices=("plain", "chat"), default="plain",
                   help="plain: the harness's C-Eval prompt as text; chat: the same prompt as a user turn")
    p.add_argument("--batch_size", type=int, default=16,
                   help="questions scored (or conversations generated) at once (default %(default)s)")
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    t = p.add_argument_group("the tool-call eval")
    t.add_argument("--toolcall", action="store_true", help="run the tool-call eval instead of --data")
    t.add_argument("--tasks", default=None, help="its task file (default: the bundled one)")
    t.add_argument("--tools", default=None, help="the Python file of its mock tools (default: the bundled one)")
    t.add_argument("--think", choices=("on", "off"), default="off", help="think before each reply")
    t.add_argument("--max_tool_rounds", type=number_at_least(int, 0), default=3,
                   help="rounds of tool calls answered per task (default %(default)s)")
    add_sampling_args(t)
    p.set_defaults(temperature=0.0, seed=0)  # greedy: the same scores every run
    args = p.parse_args(argv)
    if args.toolcall == (args.data is not None):
        p.error("give --data (multiple choice) or --toolcall (the tool-call eval)")
    if args.toolcall:
        return toolcall_main(p, args)
    data = Path(args.data)
    files = sorted(f for f in data.iterdir() if f.suffix in (".csv", ".jsonl")) if data.is_dir() else [data]
    try:
        if not files or not all(f.is_file() for f in files):
            raise FileNotFoundError(f"--data {data}: no .csv or .jsonl files there")
        subjects = {f.stem: load_items(f) for f in files}
        model, tokenizer, path = open_model(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        p.error(str(e))
    scores, right, total = {}, 0, 0
    for name, items in subjects.items():
        picks, acc = evaluate(model, tokenizer, items, args.template, args.batch_size)
        scores[name] = {"accuracy": acc, "n": len(items)}
        right += sum(p == it["answer"] for p, it in zip(picks, items))
        total += len(items)
        print(f"{name:40s} {acc:7.1%}  (n={len(items)})", flush=True)
    overall = right / max(total, 1)
    print(f"{'overall':40s} {overall:7.1%}  (n={total}, {len(subjects)} files; chance 25%)")
    if args.out:
        Path(args.out).write_text(json.dumps({"weights": str(path), "template": args.template, "overall": overall,
                                              "n": total, "subjects": scores}, indent=1, ensure_ascii=False))


def toolcall_main(p, args):
    """The tool-call eval (minimind/toolcall_eval.py) on the model of the flags."""
    from minimind.chat import open_model, sampling_config
    from minimind.tools import Toolbox
    from minimind.toolcall_eval import DEFAULT_TASKS, DEFAULT_TOOLS, load_tasks, model_completer, report, run_tasks
    try:
        toolbox = Toolbox.from_file(args.tools or DEFAULT_TOOLS)
        tasks = load_tasks(args.tasks or DEFAULT_TASKS, toolbox)
        cfg = sampling_config(args)
        model, tokenizer, path = open_model(args)
        complete = model_completer(model, tokenizer, cfg, args.think == "on", args.seed, args.batch_size)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        p.error(str(e))
    results = run_tasks(tasks, toolbox, complete, args.max_tool_rounds, args.think == "on")
    totals = report(results)
    if args.out:
        Path(args.out).write_text(json.dumps({"weights": str(path), "think": args.think, **totals,
                                              "tasks": results}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
