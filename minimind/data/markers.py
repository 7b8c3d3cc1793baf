"""The <|im_start|> ... <|im_end|> markers around pretraining text (--pretrain_markers auto|always|never).

MiniMind2's real pretrain_hq.jsonl carries its own markers: each line holds several short segments, each written
`<|im_start|>...<|im_end|>`, separated by a space, and MiniMind2's trainer adds nothing. minimind-3's pretraining
data is plain text and its trainer puts the pair around every text. A policy says what the token cache adds:

    auto     (default) only the markers a segment lacks; a text with no marker at all is wrapped whole, exactly
             as `always` wraps it
    always   the pair around every text, whatever it holds (minimind-3's trainer; it doubles the markers of a
             pre-marked text: <|im_start|><|im_start|>...<|im_end|><|im_end|>)
    never    nothing: the text's own markers only (MiniMind2's trainer)

Segments, for a text that holds at least one marker: cut the text at every marker. Each piece between two markers
(or between a marker and an end of the text) that holds more than whitespace is a *segment*; whitespace-only pieces,
like the space in `<|im_end|> <|im_start|>`, are separators. auto gives every segment the marker it lacks:
    - no <|im_start|> right before the segment: one is put before its first non-whitespace character;
    - no <|im_end|> right after it: one is put after its last non-whitespace character.
So a line of closing markers only, `A<|im_end|> B<|im_end|>`, becomes
`<|im_start|>A<|im_end|> <|im_start|>B<|im_end|>` (one pair per segment, separators kept outside), `<|im_start|>A <|im_start|>B` becomes
`<|im_start|>A<|im_end|> <|im_start|>B<|im_end|>`, and a line already in pretrain_hq's shape is left as it is.
auto only adds: markers already in the text stay as written, even a stray one with no segment beside it.
"""
import re
from dataclasses import dataclass, fields
from typing import Tuple

POLICIES = ("auto", "always", "never")


@dataclass
class MarkerCount:
    """What a policy did to a set of texts (summed over a cache's records)."""
    texts: int = 0
    texts_with_markers: int = 0  # texts that held a marker of their own
    segments: int = 0            # segments as auto sees them (a text without markers is one)
    im_start_added: int = 0
    im_end_added: int = 0

    def add(self, other: "MarkerCount") -> None:
        for k in _COUNT_FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k))


_COUNT_FIELDS = tuple(f.name for f in fields(MarkerCount))


def mark_text(text: str, policy: str, bos: str, eos: str) -> Tuple[str, MarkerCount]:
    """The text to tokenise under `policy` (see the module docstring) and what was added to it."""
    if policy not in POLICIES:
        raise ValueError(f"pretrain markers must be one of {POLICIES}, got {policy!r}")
    if bos not in text and eos not in text:
        count = MarkerCount(texts=1, segments=1)
        if policy == "never":
            return text, count
        count.im_start_added = count.im_end_added = 1
        return f"{bos}{text}{eos}", count
    pieces = re.split(f"({re.escape(bos)}|{re.escape(eos)})", text)  # run, marker, run, ..., marker, run
    out, count = [], MarkerCount(texts=1, texts_with_markers=1)
    for i in range(0, len(pieces), 2):
        run, before = pieces[i], pieces[i - 1] if i else None
        after = pieces[i + 1] if i + 1 < len(pieces) else None
        core = run.strip()
        if core:
            count.segments += 1
            if policy == "auto":
                lead, trail = run[:len(run) - len(run.lstrip())], run[len(run.rstrip()):]
                opened, closed = before == bos, after == eos
                run = f"{lead}{'' if opened else bos}{core}{'' if closed else eos}{trail}"
                count.im_start_added += not opened
                count.im_end_added += not closed
        out.append(run)
        if after is not None:
            out.append(after)
    text = "".join(out)
    if policy == "always":
        count.im_start_added = count.im_end_added = 1
        text = f"{bos}{text}{eos}"
    return text, count


def summary(m: dict) -> str:
    """One line for a data summary from a cache's meta["markers"]: the policy and what it added."""
    held = f"{m['texts_with_markers']} of {m['texts']} texts carried their own"
    if m["policy"] == "never":
        return f"never: none added ({held}; {m['segments']} segments)"
    if m["policy"] == "always":
        doubled = ", now doubled there" if m["texts_with_markers"] else ""
        return f"always: a pair around each of {m['texts']} texts ({held}{doubled})"
    return (f"auto: {m['im_start_added']} <|im_start|> and {m['im_end_added']} <|im_end|> added for "
            f"{m['segments']} segments ({held})")
