"""The held-out quiz: multiple choice by likelihood, so no generation is needed.

For each question and each of its NUM_CANDIDATES answers, score = mean log p(answer tokens | prompt); the model
is right when the true answer scores highest. Chance is 1 / NUM_CANDIDATES. Two prompt styles:
    text   "<|im_start|>Question: What is 3 plus 4?\\nAnswer:" + " 7"       (how pretraining text asks)
    chat   ChatML user turn, then the answer as the assistant's reply       (how SFT data asks)
style=None scores both and reports their mean as accuracy (plus each one), so any stage can call it.
    reason the chat prompt, then the model's own greedy reasoning "<think>\n...\n</think>\n<answer>\n" (cut where
           it closes </think>), then the answer: for a model trained on the reasoning template, whose replies do
           not start with the answer. Only the reasoning is generated; the answer is still ranked by likelihood.

    python -m minimind.demo.quiz --checkpoint out/full_sft_128.pth --hidden_size 128 --num_hidden_layers 4
"""
import json
from pathlib import Path
from typing import List, Optional

import torch

from minimind.demo.world import NUM_CANDIDATES, QuizItem, World

STYLES = ("text", "chat")  # what style=None scores
REASON_STYLE = "reason"
REASON_THINK_TOKENS = 48


def load_quiz(data_dir=None, split: str = "held_out") -> List[QuizItem]:
    """The held-out quiz (eval.jsonl of a demo data folder, or generated in memory: the same items), or with
    split="seen" the same questions about the part of the world that the training data asks about."""
    if split not in ("held_out", "seen"):
        raise ValueError(f"split must be 'held_out' or 'seen', got {split!r}")
    path = None if data_dir is None else Path(data_dir) / "eval.jsonl"
    if split == "seen" or path is None or not path.is_file():
        return World().quiz(held_out=split == "held_out")
    with open(path, encoding="utf-8") as f:
        return [QuizItem(**{**json.loads(line), "operands": tuple(json.loads(line).get("operands", (0, 0)))})
                for line in f if line.strip()]


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def _sequences(item: QuizItem, tokenizer, style: str):
    """(prompt ids, [candidate ids]) for one question in the text or chat style."""
    if style == "text":
        prompt = [tokenizer.bos_id] + tokenizer.encode(item.text_prompt)
        return prompt, [tokenizer.encode(a) for a in item.text_answers]
    prompt = tokenizer.encode(chat_prompt(tokenizer, item.question))
    return prompt, [tokenizer.encode(a) for a in item.answers]


@torch.no_grad()
def reasoning_prompts(model, quiz: List[QuizItem], tokenizer, device) -> List[List[int]]:
    """For each question: chat prompt + the model's greedy reasoning up to </think> (at most REASON_THINK_TOKENS
    tokens, one left-padded batch), closed by the template's "</think>\n<answer>\n"."""
    from minimind.generate import SamplingConfig, generate, left_pad
    prompts = [chat_prompt(tokenizer, item.question) for item in quiz]
    ids, mask = left_pad([tokenizer.encode(p) for p in prompts], tokenizer.pad_id, device)
    new = generate(model, ids, mask, SamplingConfig(max_new_tokens=REASON_THINK_TOKENS, temperature=0.0),
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    out = []
    for prompt, row in zip(prompts, new.tolist()):
        think = tokenizer.decode(row, skip_special_tokens=False).split("</think>")[0].split("<|im_end|>")[0]
        out.append(tokenizer.encode(prompt + think.rstrip("\n") + "\n</think>\n<answer>\n"))
    return out


@torch.no_grad()
def score_candidates(model, prompts, candidates, device, batch_size=64) -> torch.Tensor:
    """Mean log-prob of each candidate after its prompt: prompts[i] (ids), candidates[i] (list of id lists)
    -> (N, C) float tensor."""
    rows, owner = [], []
    for i, (p, cands) in enumerate(zip(prompts, candidates)):
        for c in cands:
            rows.append((p, c))
            owner.append(i)
    scores = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(p) + len(c) for p, c in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        attn = torch.zeros(len(chunk), T, dtype=torch.long)
        for j, (p, c) in enumerate(chunk):
            seq = torch.tensor(p + c)
            ids[j, :len(seq)], attn[j, :len(seq)] = seq, 1
            labels[j, len(p):len(seq)] = torch.tensor(c)
        ids, labels, attn = ids.to(device), labels.to(device), attn.to(device)
        lp, _ = getattr(model, "module", model).token_logprobs(ids, labels, attn)  # (a DDP wrapper has .module)
        n = (labels != -100).sum(dim=1).clamp(min=1)
        scores.append((lp.float() * (labels != -100)).sum(dim=1).cpu() / n.cpu())
    return torch.cat(scores).view(len(prompts), -1)


def evaluate(model, tokenizer, data_dir=None, device="cpu", style: Optional[str] = None,
             split: str = "held_out") -> dict:
    """Held-out quiz accuracy: {"accuracy", "n", "chance", "<style>_accuracy", "by_category"}.
    style: "text", "chat", "reason" or None (text and chat; accuracy is their mean, n counts both). split="seen" asks
    about the trained part instead (a memorisation check, not the held-out score)."""
    if style is not None and style not in STYLES + (REASON_STYLE,):
        raise ValueError(f"style must be one of {STYLES + (REASON_STYLE,)} or None, got {style!r}")
    quiz = load_quiz(data_dir, split)
    was_training = model.training
    model.eval()
    out, right_all, cats = {}, [], {}
    try:
        for st in ([style] if style else STYLES):
            if st == REASON_STYLE:
                seqs = list(zip(reasoning_prompts(model, quiz, tokenizer, device),
                                [[tokenizer.encode(a) for a in item.answers] for item in quiz]))
            else:
                seqs = [_sequences(item, tokenizer, st) for item in quiz]
            scores = score_candidates(model, [p for p, _ in seqs], [c for _, c in seqs], device)
            right = (scores.argmax(dim=1) == 0).tolist()  # the true answer is candidate 0
            out[f"{st}_accuracy"] = sum(right) / len(right)
            right_all += right
            for item, r in zip(quiz, right):
                key = f"{st}/{item.category}/{item.lang}"
                cats.setdefault(key, []).append(r)
    finally:
        model.train(was_training)
    out.update({"accuracy": sum(right_all) / len(right_all), "n": len(right_all), "chance": 1 / NUM_CANDIDATES,
                "by_category": {k: sum(v) / len(v) for k, v in sorted(cats.items())}})
    return out


def main():
    import argparse

    from minimind.config import MiniMindConfig
    from minimind.model import MiniMindForCausalLM
    from minimind.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a .pth state dict (none: a randomly initialised model)")
    ap.add_argument("--hidden_size", type=int, default=128, help="model shape (default %(default)s: the demo's)")
    ap.add_argument("--num_hidden_layers", type=int, default=4, help="model shape (default %(default)s: the demo's)")
    ap.add_argument("--num_attention_heads", type=int, default=4, help="model shape (default %(default)s: the demo's)")
    ap.add_argument("--num_key_value_heads", type=int, default=2, help="model shape (default %(default)s: the demo's)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the bundled one)")
    ap.add_argument("--data_dir", default=None, help="demo data folder with eval.jsonl (default: generated)")
    ap.add_argument("--style", choices=STYLES + (REASON_STYLE,), default=None,
                    help="how questions are asked: as text, as a chat turn, or in the reasoning template "
                         "(default: text and chat)")
    ap.add_argument("--split", choices=("held_out", "seen"), default="held_out",
                    help="held_out: facts no training question asks about; seen: the ones it does")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    args = ap.parse_args()
    cfg = MiniMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                         num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads)
    model = MiniMindForCausalLM(cfg)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model.float().to(args.device)
    print(json.dumps(evaluate(model, load_tokenizer(args.tokenizer), args.data_dir, args.device, args.style,
                              args.split),
                     indent=1))


if __name__ == "__main__":
    main()
