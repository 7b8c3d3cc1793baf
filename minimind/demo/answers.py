"""What a user sees: greedy exact-match accuracy of the model's own generated answers to the quiz questions.

The quiz (minimind.demo.quiz) ranks four given answers by likelihood; here the model writes the answer itself, so
it must produce the one right value out of every word it knows. One left-padded batch of greedy generations
(minimind.generate) per style:
    chat   the question as a ChatML user turn; the reply (up to <|im_end|>) is the answer, or, when the reply has
           an <answer> tag (the reasoning template), the text inside <answer> ... </answer>
    text   "Question: ...\\nAnswer:" (how pretraining text asks; a base model has never seen the chat template);
           the completion up to the end of its first sentence is the answer
An answer is right when, stripped of surrounding whitespace, it is one of the sentences the world states the fact
with (QuizItem.phrasings: the canonical "Liyan likes red." or a paraphrase such as "The favourite colour of Liyan
is red.") or the value alone ("red", "7", a final full stop allowed). Anything else is wrong: a wrong value, the
right value about another subject, extra sentences, a reply that opened <think> but never reached <answer>.

    python -m minimind.demo.answers --checkpoint out/full_sft_128.pth --split seen
"""
import json
import re
from typing import List, Optional

import torch

from minimind.demo.quiz import chat_prompt, load_quiz
from minimind.demo.world import QuizItem

STYLES = ("chat", "text")
ANSWER_TOKENS = 24  # a canonical answer sentence is at most ~12 tokens
REASON_TOKENS = 96  # <think> with counting steps, then <answer>: the longest demo reasoning reply is ~60 tokens
_FIRST_SENTENCE = re.compile(r"^[^.。\n]*[.。]?")


def extract_answer(reply: str, style: str = "chat") -> Optional[str]:
    """The answer part of a generated reply: inside <answer>...</answer> when the reply uses the reasoning template
    (None when it opened <think> but never reached <answer>), else the whole reply (chat) or its first sentence
    (text)."""
    if "<answer>" in reply:
        return reply.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    if "<think>" in reply:
        return None
    if style == "text":
        return _FIRST_SENTENCE.match(reply.strip()).group(0)
    return reply.strip()


def is_right(answer: Optional[str], item: QuizItem) -> bool:
    """One of the fact's phrasings, or the value alone (a final full stop allowed)."""
    if answer is None:
        return False
    return answer in item.phrasings or answer.rstrip(".。") == item.value


def _prompt(item: QuizItem, tokenizer, style: str) -> List[int]:
    if style == "text":
        return [tokenizer.bos_id] + tokenizer.encode(item.text_prompt)
    return tokenizer.encode(chat_prompt(tokenizer, item.question))


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: List[List[int]], device, max_new_tokens: int) -> List[str]:
    """Greedy replies to token-id prompts, one left-padded batch, each cut at <|im_end|> and decoded without special
    tokens (the reasoning and tool tags are plain text in the demo's tokenizer)."""
    from minimind.generate import SamplingConfig, generate, left_pad
    ids, mask = left_pad(prompts, tokenizer.pad_id, device)
    new = generate(model, ids, mask, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    out = []
    for row in new.tolist():
        if tokenizer.eos_id in row:
            row = row[:row.index(tokenizer.eos_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def generate_answers(model, tokenizer, quiz: List[QuizItem], device, style: str = "chat",
                     max_new_tokens: int = ANSWER_TOKENS) -> List[str]:
    """Greedy replies to every question of `quiz`."""
    return greedy_replies(model, tokenizer, [_prompt(item, tokenizer, style) for item in quiz], device, max_new_tokens)


def exact_match(model, tokenizer, data_dir=None, device="cpu", style: str = "chat", split: str = "held_out",
                max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Greedy exact-match accuracy on the quiz questions of `split` ("held_out" or "seen"):
    {"accuracy", "n", "by_category" (category/lang -> accuracy), "replies" [(question, reply, right)]}."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    quiz = load_quiz(data_dir, split)
    replies = generate_answers(model, tokenizer, quiz, device, style, max_new_tokens)
    right = [is_right(extract_answer(r, style), item) for item, r in zip(quiz, replies)]
    cats = {}
    for item, r in zip(quiz, right):
        cats.setdefault(f"{item.category}/{item.lang}", []).append(r)
    return {"accuracy": sum(right) / len(right), "n": len(right),
            "by_category": {k: sum(v) / len(v) for k, v in sorted(cats.items())},
            "replies": [(item.question, reply, r) for item, reply, r in zip(quiz, replies, right)]}


def main():
    import argparse

    from minimind.tokenizer import load_tokenizer
    from minimind.weights import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a weight file (e.g. out/full_sft_128.pth)")
    ap.add_argument("--data_dir", default=None, help="demo data folder with eval.jsonl (default: generated)")
    ap.add_argument("--style", choices=STYLES, default="chat")
    ap.add_argument("--split", choices=("held_out", "seen"), default="held_out")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help=f"default {ANSWER_TOKENS} ({REASON_TOKENS} for a reason_* checkpoint)")
    ap.add_argument("--show", action="store_true", help="print every question and reply")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = load_model(args.checkpoint, device=args.device)
    n = args.max_new_tokens or (REASON_TOKENS if "reason" in str(args.checkpoint) else ANSWER_TOKENS)
    r = exact_match(model, load_tokenizer(), args.data_dir, args.device, args.style, args.split, n)
    if args.show:
        for q, reply, right in r["replies"]:
            print(f"{'ok ' if right else 'BAD'} {q} -> {reply!r}")
    print(json.dumps({k: v for k, v in r.items() if k != "replies"}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
