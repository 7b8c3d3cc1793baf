"""The demo world's calculator tool: SFT conversations that call it, and the measure of a model's use of it.

A conversation that declares the tool (minimind-3's layout: the tool list inside <tools></tools> in the system turn)
asks a sum of two numbers below 20 (one above 6), which no fact of the world states; the assistant calls the tool,
the tool's result comes back, and the assistant answers with the result:

    system     <tools>\\n{"name": "add", "arguments": ["a", "b"]}\\n</tools>
    user       What is 15 plus 3?
    assistant  <tool_call>\\n{"name": "add", "arguments": {"a": 15, "b": 3}}\\n</tool_call>
    user       <tool_response>\\n18\\n</tool_response>
    assistant  18.

The demo's tokenizer speaks MiniMind2's ChatML, whose template has no tools (minimind.chat_template): `chatml`
writes the tool turns into it the way minimind-3's template lays them out (the call block from the template's own
renderer, the tool message as a user turn of <tool_response> blocks), and `parse_tool_calls` reads a reply back.
The tool list is a one-line signature, not minimind-3's full preamble and JSON schema (about 400 tokens with the
bundled tokenizer, three times the demo's whole SFT row).

Both steps are copies, which is what this model learns slowest (minimind.demo.world): the question's two numbers
into the call's arguments, ~45 tokens later, and the result into the answer. The demo trains them in a stage of
their own, as minimind-3 has a tool-call SFT (train.demo: 400 steps of these conversations alone, right after
pretraining; its SFT keeps TOOL_SHARE of them). The copy comes in a sudden transition: from the pretrained model,
8% of the eval's calls were valid after 150 steps, 25-42% after 250 and all 24 after 400; with 35% of the SFT
records instead, none was. The answer is the result alone, not the world's sum sentence ("15 plus 3 equals
18."): restating the operands once more was the step that stayed wrong (with the sentence, continuing from an SFT
model, the calls were all valid after ~800 steps and a quarter of the answers right; with the result alone all 24
were right after 300).

`tool_use` measures a model on EVAL_PAIRS (sums no training conversation asks, in both languages): a valid call
(one <tool_call> block that parses, names `add` and passes the question's two numbers), then, after the real
tool's result of the model's own call is fed back, a right final answer (the sum's sentence or its value).
"""
import json
from typing import Dict, List

import torch

from minimind.chat_template import END_TOOL_RESPONSE, TOOL_RESPONSE, parse_tool_calls, tool_call_text

TOOL_NAME = "add"
TOOLS_SYSTEM = '<tools>\n{"name": "add", "arguments": ["a", "b"]}\n</tools>'
MAX_OPERAND = 19  # small numbers: copying one of ~20 number tokens is what this model learns in one SFT stage
EVAL_PAIRS = [(7, 12), (15, 3), (9, 9), (18, 11), (2, 17), (13, 8), (10, 14), (19, 5), (11, 0), (16, 16), (4, 13),
              (8, 19)]
CALL_TOKENS = 64  # the call block is ~58 tokens with the bundled tokenizer
ANSWER_TOKENS = 24


def calculator(a: int, b: int) -> int:
    """The tool: a + b."""
    return a + b


def question(a: int, b: int, lang: str) -> str:
    return f"What is {a} plus {b}?" if lang == "en" else f"{a}加{b}等于多少？"


def answer(a: int, b: int, lang: str) -> str:
    """The final answer: the tool's result, with the language's full stop."""
    return f"{a + b}." if lang == "en" else f"{a + b}。"


def conversation(a: int, b: int, lang: str) -> List[dict]:
    """The whole tool conversation, OpenAI-style (tool_calls, a tool message)."""
    return [{"role": "system", "content": TOOLS_SYSTEM},
            {"role": "user", "content": question(a, b, lang)},
            {"role": "assistant", "content": "", "tool_calls": [{"name": TOOL_NAME, "arguments": {"a": a, "b": b}}]},
            {"role": "tool", "content": str(calculator(a, b))},
            {"role": "assistant", "content": answer(a, b, lang)}]


def chatml(messages: List[dict]) -> List[dict]:
    """Messages with tool calls and tool results -> plain system/user/assistant messages for MiniMind2's ChatML:
    an assistant turn's tool_calls become <tool_call> blocks after its content, consecutive tool messages one user
    turn of <tool_response> blocks (as minimind-3's template writes them)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            block = f"{TOOL_RESPONSE}\n{m['content']}\n{END_TOOL_RESPONSE}"
            if out and out[-1].get("tool_response"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_response": True})
            continue
        content = m.get("content") or ""
        calls = [tool_call_text(c) for c in m.get("tool_calls") or []]
        out.append({"role": m["role"], "content": "\n".join(([content] if content else []) + calls)})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def training_pair(rng):
    """(a, b) of a training conversation: both below 20, one above the world's MAX_ADDEND (so that no question
    of the world's own sums, seen or held out, is ever asked with the tool), never one of EVAL_PAIRS."""
    from minimind.demo.world import MAX_ADDEND
    while True:
        a, b = rng.randrange(MAX_OPERAND + 1), rng.randrange(MAX_OPERAND + 1)
        if max(a, b) > MAX_ADDEND and (a, b) not in EVAL_PAIRS:
            return a, b


def sft_record(rng) -> Dict:
    a, b = training_pair(rng)
    return {"conversations": chatml(conversation(a, b, rng.choice(["en", "zh"])))}


def sft_records(n, rng):
    """The tool stage's data: n tool conversations."""
    for _ in range(n):
        yield sft_record(rng)


def check_call(reply: str, a: int, b: int):
    """(valid, arguments) of a first reply: valid when it is exactly one parsable <tool_call> block (nothing else)
    naming the tool with arguments {"a": a, "b": b}; arguments are the parsed ones (None when unparsable), which
    the real tool is then run with."""
    content, calls, invalid = parse_tool_calls(reply)
    if len(calls) != 1 or invalid:
        return False, None
    args = json.loads(calls[0]["function"]["arguments"])
    ok_types = set(args) == {"a", "b"} and all(isinstance(v, int) and not isinstance(v, bool) for v in args.values())
    well_formed = calls[0]["function"]["name"] == TOOL_NAME and ok_types
    return well_formed and not content.strip() and args == {"a": a, "b": b}, (args if well_formed else None)


def _prompt(tokenizer, messages) -> List[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@torch.no_grad()
def tool_use(model, tokenizer, device="cpu") -> dict:
    """The model's use of the calculator on EVAL_PAIRS in both languages (greedy): {"n", "well_formed_calls" (share
    of first replies that call the tool in a block that parses, whatever the numbers), "valid_calls" (and with the
    question's numbers), "right_answers", "replies" [(question, first reply, final reply, valid, right)]}."""
    from minimind.demo.answers import greedy_replies
    from minimind.demo.world import sum_fact
    items = [(a, b, lang) for lang in ("en", "zh") for a, b in EVAL_PAIRS]
    first_turns = [[{"role": "system", "content": TOOLS_SYSTEM}, {"role": "user", "content": question(a, b, lang)}]
                   for a, b, lang in items]
    firsts = greedy_replies(model, tokenizer, [_prompt(tokenizer, m) for m in first_turns], device, CALL_TOKENS)
    checked = [check_call(r, a, b) for r, (a, b, _) in zip(firsts, items)]
    seconds = [None] * len(items)
    called = [i for i, (_, args) in enumerate(checked) if args is not None]
    if called:
        follow = [chatml(first_turns[i] + [{"role": "assistant", "content": firsts[i]},
                                           {"role": "tool", "content": str(calculator(**checked[i][1]))}])
                  for i in called]
        for i, r in zip(called, greedy_replies(model, tokenizer, [_prompt(tokenizer, m) for m in follow],
                                               device, ANSWER_TOKENS)):
            seconds[i] = r
    rows = []
    for (a, b, lang), first, second, (valid, _) in zip(items, firsts, seconds, checked):
        final = (second or "").strip()
        right = valid and (final.rstrip(".。") == str(a + b) or final == sum_fact(a, b, a + b, lang))
        rows.append((question(a, b, lang), first, second, valid, right))
    n = len(rows)
    return {"n": n, "well_formed_calls": len(called) / n, "valid_calls": sum(r[3] for r in rows) / n,
            "right_answers": sum(r[4] for r in rows) / n,
            "replies": rows}
