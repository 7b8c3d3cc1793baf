"""Reading MiniMind2's JSON Lines files: streamed in blocks of lines, each record validated, errors as FILE:LINE.

Formats (one JSON object per line, UTF-8; blank lines are ignored):
    pretrain         {"text": "..."}
    sft, reason      {"conversations": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}
    dpo              {"chosen": [messages], "rejected": [messages]}

A conversation is an optional leading system message, then user and assistant turns strictly alternating, starting
with a user turn, with at least one assistant turn.
"""
import json
from typing import Iterator, List, Tuple

KINDS = ("pretrain", "sft", "reason", "dpo")


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
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def _json_error(e: json.JSONDecodeError, text: str) -> str:
    """What is wrong with a line json.loads refused; a line that ends before its record does (the error at its end,
    or a string never closed: the newline fell inside it) is named as truncated."""
    end = len(text.rstrip("\r\n"))
    what = f"{e.msg.removesuffix(' at')} at column {min(e.pos, end) + 1}"  # json says "Invalid control character at"
    if e.pos >= end or e.msg.startswith("Unterminated string"):
        return f"malformed JSON: the line ends inside a record ({what}); it looks truncated"
    return f"malformed JSON: {what}"


def parse_record(kind: str, line: bytes):
    """Validate one line; returns the text (pretrain), the messages (sft/reason) or (chosen, rejected) (dpo),
    or None for a blank line. Raises RecordError."""
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
    if kind in ("sft", "reason"):
        if "conversations" not in obj:
            raise RecordError("missing field 'conversations'")
        return _check_conversation(obj["conversations"], "conversations")
    if kind == "dpo":
        for key in ("chosen", "rejected"):
            if key not in obj:
                raise RecordError(f"missing field {key!r}")
        return _check_conversation(obj["chosen"], "chosen"), _check_conversation(obj["rejected"], "rejected")
    raise ValueError(f"unknown data kind {kind!r}; choose one of {KINDS}")
