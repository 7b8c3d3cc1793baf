"""The tool-call eval: tasks a model solves by calling mock tools, scored for valid calls and a right final answer,
as MiniMind's agent RL scores its rollouts (python -m minimind.evaluate WEIGHTS --toolcall; a minimind-3 tokenizer).

A task (one JSON line of the task file; minimind/assets/toolcall/tasks.jsonl is bundled, 14 of them): a user
prompt, the tools offered (names from the tool file; minimind/assets/toolcall/tools.py: a calculator, a unit
converter, a weather and an exchange-rate lookup), the calls it needs (tool names; [] when it needs none) and the
answer: values the final reply must contain ([] = any non-empty reply).

    {"id": "km-to-miles", "prompt": "帮我把100公里换算成英里", "tools": ["convert_units", "calculate"],
     "calls": ["convert_units"], "answer": [62.14]}

Each task is a conversation: the prompt with its tools in minimind-3's template; each reply is read for
<tool_call> blocks (minimind.chat_template); the calls are run (minimind.tools: a call that does not fit is answered
with an error, as a real tool would) and their results fed back as tool messages; up to max_tool_rounds rounds of
calls, then the reply without calls is the final answer (a task still calling after that is unfinished). All the
tasks of a round are generated as one batch. Scores:

    valid calls     of every call the model wrote (a block that is not a call included), the share naming an offered
                    tool with arguments that fit its schema
    right tools     tasks whose valid calls are exactly the needed tools (any order) and which wrote no invalid call
    right answer    finished tasks whose final answer contains every expected value: a number within 1e-6 of it
                    (thousands separators allowed), a string case-insensitively
    solved          right tools and right answer

    run_tasks(tasks, toolbox, complete, max_tool_rounds=3, thinking=False) -> results (one dict per task)
    complete: [(messages, tool schemas)] -> [reply texts]; model_completer(...) makes one of a model
"""
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Sequence

import torch

from minimind.chat_template import parse_reply
from minimind.generate import SamplingConfig, rollout
from minimind.tools import Toolbox

ASSETS = Path(__file__).resolve().parent / "assets" / "toolcall"
DEFAULT_TASKS, DEFAULT_TOOLS = ASSETS / "tasks.jsonl", ASSETS / "tools.py"
NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?(?!\d)")


@dataclass
class Task:
    id: str
    prompt: str
    tools: List[str]  # the tools offered
    calls: List[str]  # the tools it needs called
    answer: list = field(default_factory=list)  # values the final answer must contain


def load_tasks(path, toolbox: Toolbox) -> List[Task]:
    """The tasks of a JSON Lines file; errors name the file and line."""
    tasks = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
                task = Task(str(obj["id"]), obj["prompt"], list(obj["tools"]), list(obj.get("calls", [])),
                            list(obj.get("answer", [])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{where}: not a task ({type(e).__name__}: {e}); a task has id, prompt, tools, "
                                 "calls, answer") from None
            unknown = [t for t in task.tools if t not in toolbox.functions]
            if unknown:
                raise ValueError(f"{where}: tools {unknown} are not in the tool file (it has "
                                 f"{sorted(toolbox.functions)})")
            if not set(task.calls) <= set(task.tools):
                raise ValueError(f"{where}: calls {task.calls} needs tools it does not offer ({task.tools})")
            tasks.append(task)
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


def contains(text: str, value) -> bool:
    """Whether `text` states `value`: a number (or a string of one) as a number within 1e-6 relative, else the
    string, ignoring case."""
    try:
        want = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        want = None
    if want is None:
        return str(value).lower() in text.lower()
    found = (float(n) for n in NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text)))
    return any(math.isclose(n, want, rel_tol=1e-6, abs_tol=1e-9) for n in found)


def run_tasks(tasks: Sequence[Task], toolbox: Toolbox, complete: Callable, max_tool_rounds: int = 3,
              thinking: bool = False) -> List[dict]:
    """Each task's conversation (see the module docstring) and its scores: one dict per task with id, messages,
    replies (the raw texts), calls (each {"call", "valid", "problem"}), invalid_blocks, finished, answer,
    right_tools, right_answer, solved."""
    states = [{"task": t, "box": toolbox.subset(t.tools), "messages": [{"role": "user", "content": t.prompt}],
               "replies": [], "calls": [], "invalid_blocks": [], "rounds": 0} for t in tasks]
    active = list(states)
    while active:
        texts = complete([(s["messages"], s["box"].schemas) for s in active])
        still = []
        for s, text in zip(active, texts):
            reply = parse_reply(text, thinking_open=thinking)
            s["replies"].append(text)
            s["messages"].append(reply.message())
            s["invalid_blocks"] += reply.invalid_tool_calls
            for call in reply.tool_calls:
                problem = s["box"].check(call)
                s["calls"].append({"call": call["function"], "valid": problem is None, "problem": problem})
            if reply.tool_calls and s["rounds"] < max_tool_rounds:
                s["messages"] += s["box"].respond(reply.tool_calls)
                s["rounds"] += 1
                still.append(s)
            else:
                s["finished"], s["answer"] = not reply.tool_calls, reply.content
        active = still
    return [score(s) for s in states]


def score(state: dict) -> dict:
    task, calls = state["task"], state["calls"]
    valid_names = Counter(c["call"]["name"] for c in calls if c["valid"])
    right_tools = valid_names == Counter(task.calls) and all(c["valid"] for c in calls) \
        and not state["invalid_blocks"]
    answer = state["answer"]
    right_answer = state["finished"] and (all(contains(answer, v) for v in task.answer) if task.answer
                                          else bool(answer.strip()))
    return {"id": task.id, "messages": state["messages"], "replies": state["replies"], "calls": calls,
            "invalid_blocks": state["invalid_blocks"], "finished": state["finished"], "answer": answer,
            "right_tools": right_tools, "right_answer": right_answer, "solved": right_tools and right_answer}


def summarize(results: Sequence[dict]) -> dict:
    """The scores over all tasks: valid_calls (None when no call was written), right_tools, right_answer, solved."""
    written = sum(len(r["calls"]) + len(r["invalid_blocks"]) for r in results)
    valid = sum(c["valid"] for r in results for c in r["calls"])
    n = max(len(results), 1)
    return {"n": len(results), "calls_written": written, "valid_calls": valid / written if written else None,
            **{k: sum(r[k] for r in results) / n for k in ("right_tools", "right_answer", "solved")}}


def model_completer(model, tokenizer, cfg: SamplingConfig, thinking: bool = False, seed: int = 0,
                    batch_size: int = 16) -> Callable:
    """complete() for run_tasks on a model: each conversation rendered with its tools by the tokenizer's template,
    the replies generated together on the engine (batch_size rows at a time, a finished row's place going to the
    next; each row samples from its own seed, so it says what it would alone), cut at <|im_end|>."""
    if not tokenizer.supports_tools:
        raise ValueError(f"the tool-call eval needs a tokenizer with minimind-3's chat format (tools); "
                         f"{tokenizer.name} has MiniMind2's: pass --tokenizer")
    cfg = replace(cfg, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    generator = torch.Generator().manual_seed(seed)

    def complete(conversations):
        prompts = [tokenizer.encode(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                                  enable_thinking=thinking))
                   for messages, tools in conversations]
        r = rollout(model, prompts, 1, cfg, generator, max_batch=batch_size)
        return [tokenizer.decode(row[mask & (row != tokenizer.eos_id)].tolist(), skip_special_tokens=True)
                for row, mask in zip(r.completions, r.completion_mask)]
    return complete


def report(results: Sequence[dict], out=print) -> dict:
    """Print a line per task and the totals; return the totals."""
    for r in results:
        calls = ", ".join(f"{c['call']['name']}{'' if c['valid'] else ' (invalid)'}" for c in r["calls"])
        calls += ", " * bool(calls and r["invalid_blocks"]) + "not a call" * bool(r["invalid_blocks"])
        out(f"{r['id']:24s} tools {'ok ' if r['right_tools'] else 'no '} answer {'ok ' if r['right_answer'] else 'no '}"
            f" {'' if r['finished'] else '(unfinished) '}calls: {calls or '-'}")
    totals = summarize(results)
    valid = "-" if totals["valid_calls"] is None else f"{totals['valid_calls']:.1%}"
    out(f"{'overall':24s} valid calls {valid} of {totals['calls_written']}, right tools {totals['right_tools']:.1%}, "
        f"right answer {totals['right_answer']:.1%}, solved {totals['solved']:.1%} (n={totals['n']})")
    return totals
