"""Reading MiniMind's JSON Lines files: streamed in blocks of lines, each record validated, errors as FILE:LINE.

Formats (one JSON object per line, UTF-8; blank lines are ignored):
    pretrain         {"text": "..."}
    sft, reason      {"conversations": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}
    dpo              {"chosen": [messages], "rejected": [messages]}
    rl               {"conversations": [...], "answer": "..." (optional)}: MiniMind's rlaif.jsonl. The last message
                     is the assistant's (its content is not used); the prompt is every message before it. `answer`
                     (a string or a number) is what the `answer` reward of the RL stages compares the reply with.

How a conversation is checked depends on the tokenizer's chat format (minimind.chat_template):
  minimind2  MiniMind2's: an optional leading system message, then user and assistant turns strictly alternating,
             starting with a user turn, with at least one assistant turn.
  minimind3  minimind-3's t2t data as well: a message may carry `reasoning_content` (assistant), `tools` (the
             leading system message; a list of function schemas or its JSON string) and `tool_calls` (assistant; a
             list of {"name", "arguments"} or {"type": "function", "function": {...}}, or its JSON string; then
             `content` may be null). Roles system (first only), user, assistant, tool: a user turn follows the
             start or an assistant; an assistant follows a user or a tool; a tool message follows an assistant with
             tool_calls or another tool message. At least one assistant turn.
A conversation is returned as (messages, tools): messages with JSON strings parsed, tools a list or None.
"""
import json
from typing import Iterator, List, Tuple

KINDS = ("pretrain", "sft", "reason", "dpo", "rl")


class DataError(ValueError):
    """A bad record or file; the message starts with "FILE:LINE:"."""


class RecordError(ValueError):
    """What is wrong with one record (the caller adds file and line)."""


def iter_line_blocks(path, max_lines: int = 2048, max_bytes: int = 4 << 20) -> Iterator[Tuple[int, List[bytes]]]:
    """Yield (first line number, raw lines) blocks; never holds more than one block of the file in memory."""
    block, size, first = [], 0, 1
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors)
            if not block:
                first = lineno
            block.append(line)
            size += len(line)
            if len(block) >= max_lines or size >= max_bytes:
                yield first, block
                block, size = [], 0
    if block:
        yield first, block


def _check_conversation(conv, field):
    """MiniMind2's conversation rules (the module docstring)."""
    if not isinstance(conv, list):
        raise RecordError(f"field {field!r} must be a list of messages, got {type(conv).__name__}")
    if not conv:
        raise RecordError(f"field {field!r} is an empty conversation")
    for i, m in enumerate(conv):
        if not isinstance(m, dict):
            raise RecordError(f"{field}[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise RecordError(f"{field}[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise RecordError(f"{field}[{i}].{key} must be a string, got {type(m[key]).__name__}")
    turns = conv[1:] if conv[0]["role"] == "system" else conv
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            pos = i + (len(conv) - len(turns))
            raise RecordError(f"{field}[{pos}] has role {m['role']!r} where {expected!r} was expected "
                              f"(turns must alternate user, assistant, ... after an optional system message)")
    if len(turns) < 2:
        raise RecordError(f"field {field!r} has no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in conv], None


T2T_ROLES = ("system", "user", "assistant", "tool")
T2T_FOLLOWS = {"user": "the start or an assistant message", "assistant": "a user or tool message",
               "tool": "an assistant message with tool_calls, or another tool message"}


def _json_field(value, where):
    """A field given as an object or as its JSON string: the parsed value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where} is not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}") from None


def _check_tool_calls(value, where) -> list:
    calls = _json_field(value, where)
    if not isinstance(calls, list):
        raise RecordError(f"{where} must be a list of calls, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if isinstance(call, dict) and "function" in call:
            call, at = call["function"], f"{at}.function"
        if not isinstance(call, dict):
            raise RecordError(f"{at} must be an object, got {type(call).__name__}")
        if not isinstance(call.get("name"), str) or not call["name"]:
            raise RecordError(f"{at} has no function 'name'")
        if "arguments" not in call:
            raise RecordError(f"{at} has no 'arguments'")
        args = _json_field(call["arguments"], f"{at}.arguments")
        if not isinstance(args, dict):
            raise RecordError(f"{at}.arguments must be an object (or its JSON string), got {type(args).__name__}")
    return calls


def _check_t2t_message(m, i, field):
    """One message of a minimind-3 conversation, normalised: (message, tools or None)."""
    at = f"{field}[{i}]"
    if not isinstance(m, dict):
        raise RecordError(f"{at} must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role is None:
        raise RecordError(f"{at} has no 'role'")
    if role not in T2T_ROLES:
        raise RecordError(f"{at} has unknown role {role!r} (expected one of {', '.join(T2T_ROLES)})")
    if role == "system" and i > 0:
        raise RecordError(f"{at} is a system message after the first message")
    calls = m.get("tool_calls")
    if calls not in (None, "", []):
        if role != "assistant":
            raise RecordError(f"{at} is a {role} message with tool_calls (only an assistant calls tools)")
        calls = _check_tool_calls(calls, f"{at}.tool_calls")
    else:
        calls = None
    content = m.get("content")
    if content is None and calls is None:
        raise RecordError(f"{at} has no 'content'" + (" (null)" if "content" in m else ""))
    if content is not None and not isinstance(content, str):
        raise RecordError(f"{at}.content must be a string, got {type(content).__name__}")
    msg = {"role": role, "content": content or ""}
    reasoning = m.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise RecordError(f"{at}.reasoning_content must be a string, got {type(reasoning).__name__}")
        if role == "assistant":
            msg["reasoning_content"] = reasoning
    if calls is not None:
        msg["tool_calls"] = calls
    tools = m.get("tools")
    if tools in (None, "", []):
        return msg, None
    if role != "system":
        raise RecordError(f"{at} is a {role} message with tools (tools belong on the leading system message)")
    tools = _json_field(tools, f"{at}.tools")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError(f"{at}.tools must be a list of function schemas (or its JSON string)")
    return msg, tools


def _a(role):
    return "an" if role == "assistant" else "a"


def _check_t2t_conversation(conv, field):
    """minimind-3's conversation rules (the module docstring)."""
    if not isinstance(conv, list):
        raise RecordError(f"field {field!r} must be a list of messages, got {type(conv).__name__}")
    if not conv:
        raise RecordError(f"field {field!r} is an empty conversation")
    messages, tools, prev = [], None, None
    for i, m in enumerate(conv):
        msg, t = _check_t2t_message(m, i, field)
        tools = t if t is not None else tools
        role = msg["role"]
        if role != "system":
            ok = {"user": prev in (None, "assistant"), "assistant": prev in ("user", "tool"),
                  "tool": prev == "tool" or (prev == "assistant" and "tool_calls" in messages[-1])}[role]
            if not ok:
                after = "the start" if prev is None else f"{_a(prev)} {prev} message"
                if role == "tool":
                    raise RecordError(f"{field}[{i}] is a tool message with no preceding tool call (it follows "
                                      f"{after})")
                raise RecordError(f"{field}[{i}] is {_a(role)} {role} message following {after} ({_a(role)} "
                                  f"{role} message follows {T2T_FOLLOWS[role]})")
            prev = role
        messages.append(msg)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"field {field!r} has no assistant turn")
    return messages, tools


def _json_error(e: json.JSONDecodeError, text: str) -> str:
    """What is wrong with a line json.loads refused; a line that ends before its record does (the error at its end,
    or a string never closed: the newline fell inside it) is named as truncated."""
    end = len(text.rstrip("\r\n"))
    what = f"{e.msg.removesuffix(' at')} at column {min(e.pos, end) + 1}"  # json says "Invalid control character at"
    if e.pos >= end or e.msg.startswith("Unterminated string"):
        return f"malformed JSON: the line ends inside a record ({what}); it looks truncated"
    return f"malformed JSON: {what}"


def _rl_prompt(obj, check):
    """(prompt messages, tools, answer as a string or None) of an rl record (the module docstring)."""
    if "conversations" not in obj:
        raise RecordError("missing field 'conversations'")
    messages, tools = check(obj["conversations"], "conversations")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"conversations[{len(messages) - 1}] is a {messages[-1]['role']} message; RL data ends with "
                          "the assistant's turn (the prompt is every message before it)")
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise RecordError(f"field 'answer' must be a string or a number, got {type(answer).__name__}")
    return messages[:-1], tools, None if answer is None else str(answer)


CHECKS = {"minimind2": _check_conversation, "minimind3": _check_t2t_conversation}


def parse_record(kind: str, line: bytes, chat_format: str = "minimind2"):
    """Validate one line; returns the text (pretrain), the conversation (messages, tools) (sft/reason), (chosen,
    rejected) conversations (dpo), the prompt (messages, tools, answer or None) (rl), or None for a blank line.
    chat_format: the rules conversations follow (the module docstring). Raises RecordError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(_json_error(e, text)) from None
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    if kind == "pretrain":
        if "text" not in obj:
            raise RecordError("missing field 'text'")
        if not isinstance(obj["text"], str):
            raise RecordError(f"field 'text' must be a string, got {type(obj['text']).__name__}")
        if not obj["text"]:
            raise RecordError("field 'text' is empty")
        return obj["text"]
    check = CHECKS[chat_format]
    if kind in ("sft", "reason"):
        if "conversations" not in obj:
            raise RecordError("missing field 'conversations'")
        return check(obj["conversations"], "conversations")
    if kind == "dpo":
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise RecordError(f"missing field {key!r}")
        return check(obj["chosen"], "chosen"), check(obj["rejected"], "rejected")
    if kind == "rl":
        return _rl_prompt(obj, check)
    raise ValueError(f"unknown data kind {kind!r}; choose one of {KINDS}")
