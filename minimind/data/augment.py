"""MiniMind's two training-time augmentations of SFT conversations, applied to cached tokens, exact and reproducible.

    add_system_ratio        with this probability a conversation with no system message and no tools gets one of
                            SYSTEM_PROMPTS (uniformly) as its system turn. MiniMind (minimind-3): 0.2
    drop_empty_think_ratio  with this probability every empty think block `<think>\\n\\n</think>\\n\\n` of the
                            rendered conversation is removed. MiniMind (minimind-3): 0.8 (its own parameter,
                            empty_think_ratio = 0.2, is the probability of keeping them)

MiniMind draws both in its Dataset's __getitem__ from Python's global `random`. Here an item's draws come from an
RNG seeded by (seed, epoch, item): a run is reproducible under --seed, a resumed run sees exactly the variants the
uninterrupted run would have seen, and the world size changes nothing.

The token cache stores each conversation rendered as it is, plus what the augmentations need (ChatExtras, built by
`chat_extras` when the cache is built):
    system_ok   uint8 (N,)      1 when the conversation has no system message and no tools
    edit_index  int64 (N + 1,)  sequence i's think-drop edits are edits[edit_index[i]:edit_index[i + 1]]
    edits       int64 (E, 4)    (start, stop, lo, hi): tokens [start, stop) of the sequence become
                                repl_tokens[lo:hi] (loss mask repl_mask[lo:hi])
Adding a system turn is exact on tokens: a turn ends with `<|im_end|>\\n` and the next starts with the special
`<|im_start|>`, which the tokenizer never merges across; the new turn replaces the format's default system turn
(MiniMind2's "You are a helpful assistant"; minimind-3 has none). Dropping a think block mostly deletes its tokens
(lo == hi); where the text after it would tokenise differently without it (an answer starting with whitespace that
merges with the block's newlines), the re-tokenised stretch is stored. When the cache is built, every edit list is
either proven to give exactly the tokens and mask of the text with the blocks removed (`deletion_is_exact`: the
common case, for the tokenizers of both MiniMind generations) or checked against tokenising that text.
"""
import json
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from minimind.chat_template import EMPTY_THINK, render

# MiniMind's ten system prompts (a data fact: the texts its SFT adds)
SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)
MINIMIND_RATIOS = {"minimind3": (0.2, 0.8), "minimind2": (0.0, 0.0)}  # (add_system_ratio, drop_empty_think_ratio)
EMPTY_THINK_BYTES = EMPTY_THINK.encode("utf-8")


def default_ratios(chat_format: str) -> Tuple[float, float]:
    """MiniMind's (add_system_ratio, drop_empty_think_ratio) for a chat format: its SFT's for minimind-3, off for
    MiniMind2 (whose SFT had neither)."""
    return MINIMIND_RATIOS[chat_format]


# ---- cache side ----

@dataclass
class ChatExtras:
    system_ok: np.ndarray    # uint8 (N,)
    edit_index: np.ndarray   # int64 (N + 1,)
    edits: np.ndarray        # int64 (E, 4)
    repl_tokens: np.ndarray  # uint16 (R,)
    repl_mask: np.ndarray    # uint8 (R,)

    FILES = (("system_ok", np.uint8), ("edit_index", np.int64), ("edits", np.int64), ("repl_tokens", np.uint16),
             ("repl_mask", np.uint8))

    def edits_of(self, i: int) -> np.ndarray:
        return self.edits[self.edit_index[i]:self.edit_index[i + 1]]


def strip_empty_think(text: str, spans: Sequence[Tuple[int, int]]):
    """(text with every empty think block removed, the spans moved accordingly, the blocks' byte offsets)."""
    data = text.encode("utf-8")
    found, at = [], data.find(EMPTY_THINK_BYTES)
    while at >= 0:  # left to right, not overlapping: what str.replace removes
        found.append(at)
        at = data.find(EMPTY_THINK_BYTES, at + len(EMPTY_THINK_BYTES))
    n = len(EMPTY_THINK_BYTES)

    def moved(x):
        return x - sum(min(max(x - o, 0), n) for o in found)

    return text.replace(EMPTY_THINK, ""), [(moved(lo), moved(hi)) for lo, hi in spans], found


def block_cuts(starts: np.ndarray, nbytes: int, blocks: List[int]) -> Optional[List[Tuple[int, int]]]:
    """Token ranges [a, b) of the blocks at byte offsets `blocks` (`starts`: the tokens' byte offsets), or None when
    a block does not begin and end on token boundaries."""
    n, cuts = len(EMPTY_THINK_BYTES), []
    for o in blocks:
        a, b = np.searchsorted(starts, o), np.searchsorted(starts, o + n)
        if a == len(starts) or starts[a] != o or not ((b < len(starts) and starts[b] == o + n) or
                                                      (b == len(starts) and o + n == nbytes)):
            return None
        cuts.append((int(a), int(b)))
    return cuts


def think_drop_edits(ids, mask, cuts, new_ids, new_mask):
    """Edits (start, stop, replacement ids, replacement mask) turning (ids, mask) into (new_ids, new_mask), the
    tokens of the text without the empty think blocks: deletions of the blocks' own tokens (`cuts`, or None) when
    that gives them, else one replacement of the stretch between the first and the last difference."""
    if cuts is not None:
        keep = np.ones(len(ids), dtype=bool)
        for a, b in cuts:
            keep[a:b] = False
        if np.array_equal(ids[keep], new_ids) and np.array_equal(mask[keep], new_mask):
            return [(a, b, new_ids[:0], new_mask[:0]) for a, b in cuts]
    same = min(len(ids), len(new_ids))
    diff = np.flatnonzero((ids[:same] != new_ids[:same]) | (mask[:same] != new_mask[:same]))
    p = int(diff[0]) if len(diff) else same
    s = 0
    while s < same - p and ids[-1 - s] == new_ids[-1 - s] and mask[-1 - s] == new_mask[-1 - s]:
        s += 1
    return [(p, len(ids) - s, new_ids[p:len(new_ids) - s], new_mask[p:len(new_mask) - s])]


def regex_byte_level(tokenizer) -> bool:
    """Whether the tokenizer pre-tokenises with GPT-2's regex (ByteLevel, use_regex, no prefix space, no normalizer),
    optionally after splitting off Han characters (our --split_han): the family for which deleting a block in its
    template place is provably exact (see `deletion_is_exact`). MiniMind2's and minimind-3's tokenizers are."""
    if tokenizer.fingerprint not in _REGEX_BYTE_LEVEL:
        spec = json.loads(tokenizer.hf.to_str())
        pre = spec.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        last = parts[-1] if parts else {}
        han = {"type": "Split", "pattern": {"Regex": "\\p{Han}"}, "behavior": "Isolated", "invert": False}
        _REGEX_BYTE_LEVEL[tokenizer.fingerprint] = (
            spec.get("normalizer") is None and last.get("type") == "ByteLevel" and last.get("use_regex") is True
            and last.get("add_prefix_space") is False and all(p == han for p in parts[:-1]))
    return _REGEX_BYTE_LEVEL[tokenizer.fingerprint]


_REGEX_BYTE_LEVEL = {}
TEMPLATE_PLACE = b"<|im_start|>assistant\n"


def deletion_is_exact(data: bytes, o: int) -> bool:
    """For a regex_byte_level tokenizer: deleting the block at byte offset o only deletes its own tokens, when the
    block sits in its template place (right after `<|im_start|>assistant\\n`) and is followed by the end of the text
    or a character that is not whitespace. Why: the added tokens <|im_start|>, <think>, </think> cut the text into
    pieces that are tokenised apart, so only the pieces "assistant\\n" and "\\n\\n" + C change, into "assistant\\n" +
    C. In GPT-2's regex a pre-token holding a newline is all whitespace (the only prefix other pre-tokens take is
    one space), so with C[0] not whitespace both split right before C, and C is pre-tokenised from there as on
    its own (the regex looks back at nothing): C's tokens are the same, and "assistant\\n" keeps its own."""
    nxt = data[o + len(EMPTY_THINK_BYTES):o + len(EMPTY_THINK_BYTES) + 4].decode("utf-8", errors="ignore")[:1]
    return data[max(0, o - len(TEMPLATE_PLACE)):o] == TEMPLATE_PLACE and not nxt.isspace()


def chat_extras(tokenizer, conversations, rendered, encoded):
    """The ChatExtras arrays of one block of sequences, replacement offsets relative to the block:
    (system_ok (n,), edit counts (n,), edits (E, 4), repl_tokens, repl_mask). Think-drop edits are deletions where
    `deletion_is_exact` proves them so; every other sequence with empty think blocks is tokenised again without
    them and compared (think_drop_edits)."""
    system_ok = np.asarray([not tools and not (msgs and msgs[0]["role"] == "system")
                            for msgs, tools in conversations], dtype=np.uint8)
    proven = regex_byte_level(tokenizer)
    per_sequence, check = {}, []
    for i, (text, spans) in enumerate(rendered):
        if EMPTY_THINK not in text:
            continue
        data = text.encode("utf-8")
        stripped, new_spans, blocks = strip_empty_think(text, spans)
        cuts = block_cuts(tokenizer.token_starts(encoded[i][0]), len(data), blocks)
        if proven and cuts is not None and all(deletion_is_exact(data, o) for o in blocks):
            mask = encoded[i][1]
            per_sequence[i] = [(a, b, encoded[i][0][:0], mask[:0]) for a, b in cuts]
        else:
            check.append((i, cuts, (stripped, new_spans)))
    for (i, cuts, _), (new_ids, new_mask) in zip(check, tokenizer.encode_rendered([r for _, _, r in check])):
        per_sequence[i] = think_drop_edits(*encoded[i], cuts, new_ids, new_mask)
    counts = np.zeros(len(rendered), dtype=np.int64)
    edits, repl_tokens, repl_mask, r = [], [], [], 0
    for i in sorted(per_sequence):
        for a, b, rt, rm in per_sequence[i]:
            edits.append((a, b, r, r + len(rt)))
            repl_tokens.append(rt)
            repl_mask.append(rm)
            r += len(rt)
        counts[i] = len(per_sequence[i])
    edits = np.asarray(edits, dtype=np.int64).reshape(-1, 4)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return system_ok, counts, edits, cat(repl_tokens, np.uint16), cat(repl_mask, np.uint8)


# ---- loader side ----

class ChatAugmenter:
    """Applies the augmentations to cached sequences; see the module docstring."""

    def __init__(self, tokenizer, add_system_ratio: float = 0.0, drop_empty_think_ratio: float = 0.0):
        for name, p in (("add_system_ratio", add_system_ratio), ("drop_empty_think_ratio", drop_empty_think_ratio)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.add_system_ratio, self.drop_empty_think_ratio = float(add_system_ratio), float(drop_empty_think_ratio)
        fmt = tokenizer.format
        self.default_system_len = len(tokenizer.encode(render(fmt, [])[0]))
        self.system_turns = [np.asarray(tokenizer.encode(render(fmt, [{"role": "system", "content": p}])[0]),
                                        dtype=np.int64) for p in SYSTEM_PROMPTS]

    @property
    def active(self) -> bool:
        return self.add_system_ratio > 0 or self.drop_empty_think_ratio > 0

    def draw(self, seed: int, epoch: int, item: int) -> Tuple[Optional[int], bool]:
        """(index of the system prompt to add or None, whether to drop the empty think blocks) for one item."""
        rng = np.random.default_rng([seed, epoch, item])
        u_system, u_drop = rng.random(2)
        k = int(rng.integers(len(SYSTEM_PROMPTS)))
        return (k if u_system < self.add_system_ratio else None), bool(u_drop < self.drop_empty_think_ratio)

    def apply(self, tokens, mask, extras: ChatExtras, item: int, system: Optional[int], drop: bool):
        """(tokens int64, mask uint8) of sequence `item` (cached `tokens`, `mask`) with the drawn augmentations."""
        tokens, mask = np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=np.uint8)
        if drop and extras.edit_index[item + 1] > extras.edit_index[item]:
            tok_parts, mask_parts, pos = [], [], 0
            for a, b, lo, hi in extras.edits_of(item):
                tok_parts += [tokens[pos:a], extras.repl_tokens[lo:hi].astype(np.int64)]
                mask_parts += [mask[pos:a], extras.repl_mask[lo:hi]]
                pos = b
            tokens = np.concatenate(tok_parts + [tokens[pos:]])
            mask = np.concatenate(mask_parts + [mask[pos:]])
        if system is not None and extras.system_ok[item]:
            turn = self.system_turns[system]
            tokens = np.concatenate([turn, tokens[self.default_system_len:]])
            mask = np.concatenate([np.zeros(len(turn), np.uint8), mask[self.default_system_len:]])
        return tokens, mask
