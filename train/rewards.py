"""Rewards of the RL stages: `--reward rules,answer,model,module:function`, summed per reply.

    rules            MiniMind's rule terms on the decoded reply (characters, as MiniMind counts them):
                     +0.5 if 20 <= len(reply.strip()) <= 800 else -0.5; with a `</think>`: +1 if the thinking before
                     the first one is 20-300 characters else -0.5, +0.25 if there is exactly one else -0.25; minus
                     the repetition penalty of the answer (after the first `</think>`):
                     min(0.5, 2 * 0.5 * repeated 3-grams / 3-grams) over word and punctuation tokens
    answer           1 if the reply's final answer matches the record's `answer` field, else 0 (`answer_matches`;
                     0 for a record without one, which the RL stages accept only beside other terms);
                     a reply with more than one `<answer>` tag anywhere (its thinking included) answered more than
                     once and gets 0: otherwise a policy can drift into `<answer>` in place of `<think>` and still
                     be paid for a later block
    model            a local Hugging Face sequence-classification model (--reward_model_path DIR, one label) scores
                     the conversation plus the reply's answer, clipped to [-3, 3] (MiniMind: InternLM2-1.8B-Reward)
    module:function  your code: function(prompts, replies) -> one float per reply, where prompts[i] is row i's
                     conversation (a list of {"role", "content"} messages) and replies[i] its decoded reply;
                     `module` is imported as Python imports it (from the current folder or the installed packages)
"""
import importlib
import math
import re

import torch

from minimind.chat_template import END_THINK, split_thinking
from train.engine import ConfigError

BUILTIN = ("rules", "answer", "model")
REWARD_MODEL_CLIP = 3.0


def rep_penalty(text, n=3, cap=0.5):
    """min(cap, 2 * cap * repeated n-grams / n-grams) of the text's word and punctuation tokens (lower-cased)."""
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def rules_reward(reply: str) -> float:
    """MiniMind's rule terms (module docstring)."""
    r = 0.5 if 20 <= len(reply.strip()) <= 800 else -0.5
    answer = reply
    if END_THINK in reply:
        thinking, answer = reply.split(END_THINK, 1)
        r += 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
        r += 0.25 if reply.count(END_THINK) == 1 else -0.25
        answer = answer.strip()
    return r - rep_penalty(answer)


ANSWER_OPEN = "<answer>"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TRAILING = ".。!！?？,，;；:："


def final_answer(text: str) -> str:
    """The final answer of a reply's answer part: its <answer>...</answer> block ('' when there are several), else
    its last non-empty line."""
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[0].strip() if len(tagged) == 1 else ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _normal(s: str) -> str:
    return " ".join(s.strip().strip("\"'“”‘’").rstrip(_TRAILING).split()).casefold()


def answer_matches(text: str, answer: str) -> bool:
    """Whether the final answer of `text` (a reply's answer part) is `answer`: equal after trimming spaces, quotes,
    trailing punctuation and case; for a numeric answer, the final answer's last number equals it; and an answer
    stated in a sentence counts when the sentence ends with it as a whole word ("Liyan likes red." for "red",
    "3 plus 4 equals 7." for "7", "叶嘉住在瓦伦堡。" for "瓦伦堡")."""
    got, want = _normal(final_answer(text)), _normal(answer)
    if not want:
        return False
    if got == want:
        return True
    if _NUMBER.fullmatch(want):
        numbers = _NUMBER.findall(got)
        return bool(numbers) and float(numbers[-1]) == float(want)
    if not got.endswith(want):
        return False
    before = got[-len(want) - 1] if len(got) > len(want) else " "
    return not (before.isalnum() and want[0].isalnum() and before.isascii() and want[0].isascii())


class RewardModel:
    """A local Hugging Face sequence-classification reward model: score(conversations, answers) -> floats in [-3, 3].
    The text scored is the conversation plus {"role": "assistant", "content": answer} in the reward model's own
    chat template (or "role: content" lines when its tokenizer has none), truncated from the left."""

    def __init__(self, path, device, dtype=torch.float32):
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise ConfigError("--reward model needs transformers: pip install transformers") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--reward_model_path {path}: not a Hugging Face sequence-classification model folder "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if self.model.config.num_labels != 1:
            raise ConfigError(f"--reward_model_path {path}: a reward model has one output (num_labels 1), this one "
                              f"has {self.model.config.num_labels}")
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.tokenizer.truncation_side = "left"  # keep the reply

    def text(self, messages, answer: str) -> str:
        conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
        conversation.append({"role": "assistant", "content": answer})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in conversation)

    @torch.no_grad()
    def score(self, conversations, answers):
        limit = min(self.tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", 1 << 30))
        out = []
        for messages, answer in zip(conversations, answers):  # one at a time: no padding convention needed
            enc = self.tokenizer(self.text(messages, answer), return_tensors="pt", truncation=True, max_length=limit)
            score = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits[0, 0].float().item()
            out.append(max(-REWARD_MODEL_CLIP, min(REWARD_MODEL_CLIP, score)))
        return out


def parse_spec(spec: str, reward_model_path=None):
    """The reward names of --reward (None: rules, plus model when --reward_model_path is given), each checked:
    a user function is imported and must be callable. Returns [(name, function or None)]."""
    if spec is None:
        spec = "rules" + (",model" if reward_model_path else "")
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"--reward {spec!r} names no reward; use rules, answer, model or module:function")
    out = []
    for name in names:
        if name in BUILTIN:
            out.append((name, None))
            continue
        if ":" not in name:
            raise ConfigError(f"--reward {name!r}: not one of {', '.join(BUILTIN)}, nor module:function")
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ConfigError(f"--reward {name}: cannot import {module} ({e})") from None
        except AttributeError:
            raise ConfigError(f"--reward {name}: module {module} has no {attr!r}") from None
        if not callable(fn):
            raise ConfigError(f"--reward {name}: {module}.{attr} is not callable")
        out.append((name, fn))
    if len({n for n, _ in out}) != len(out):
        raise ConfigError(f"--reward {spec}: a reward is named twice")
    if any(n == "model" for n, _ in out) and not reward_model_path:
        raise ConfigError("--reward model needs --reward_model_path DIR (a local Hugging Face sequence-classification "
                          "reward model)")
    return out


class Rewards:
    """The summed rewards of --reward: rewards(records, replies, thinking) -> ((N,) float32 tensor, {name: (N,)})."""

    def __init__(self, spec, reward_model_path=None, device="cpu", dtype=torch.float32):
        self.terms = parse_spec(spec, reward_model_path)
        self.names = [n for n, _ in self.terms]
        self.model = RewardModel(reward_model_path, device, dtype) if "model" in self.names else None

    def __call__(self, records, replies, thinking):
        answers = [split_thinking(reply, open_)[1] for reply, open_ in zip(replies, thinking)]
        parts = {}
        for name, fn in self.terms:
            if name == "rules":
                values = [rules_reward(r) for r in replies]
            elif name == "answer":
                values = [float(reply.count(ANSWER_OPEN) <= 1 and answer_matches(a, rec["answer"] or ""))
                          for reply, a, rec in zip(replies, answers, records)]
            elif name == "model":
                values = self.model.score([rec["messages"] for rec in records], answers)
            else:
                values = _checked(name, fn([rec["messages"] for rec in records], list(replies)), len(replies))
            parts[name] = torch.tensor(values, dtype=torch.float32)
        return sum(parts.values()), parts


def _checked(name, values, n):
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"--reward {name} returned {type(values).__name__}, not {n} numbers ({e})") from None
    if len(values) != n or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--reward {name} must return {n} finite numbers (one per reply), got {values[:8]}"
                         f"{'...' if len(values) > 8 else ''}")
    return values
