"""Text generation on the model's KV cache: greedy, temperature, top-k, top-p, repetition penalty, streaming.

One step: logits of the last position -> (repetition penalty) -> / temperature -> keep the top_k -> keep the
smallest set whose probability reaches top_p -> sample (or argmax when temperature is 0). The prompt runs once;
every next token runs alone against the cache (`model(ids, past_key_values=cache, use_cache=True)`).

Batches: prompts of different lengths are left-padded (`left_pad`) with an attention mask; rotary attention
depends only on relative positions, so a padded row decodes exactly as it would alone. A row that emits eos
(<|im_end|> = 2) is finished: it gets pad tokens afterwards, and decoding stops when every row is finished.

    generate(model, input_ids, max_new_tokens=..., temperature=..., top_p=..., top_k=...) -> (B, new) ids
    stream(model, input_ids, ...)                  yields one (B,) tensor of token ids per step
    stream_text(model, tokenizer, prompt_ids, ...) yields text pieces as they become valid UTF-8
    stream_chat(model, tokenizer, messages, ...)   the same for the assistant's reply to a conversation
    chat(model, tokenizer, messages, ...) -> str   the assistant's reply
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch


GREEDY_BELOW = 1e-5  # temperatures under this decode greedily


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.85  # 0 (or below 1e-5, where logits / T would overflow) = greedy
    top_p: float = 0.85  # 1 = off, 0 = only the most likely token (as OpenAI's API allows)
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style: a seen token's logit is divided (>0) or multiplied (<0)
    eos_token_id: Optional[int] = 2
    pad_token_id: int = 0
    use_cache: bool = True  # False recomputes the whole sequence every step (the reference path, for tests)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits, seen_ids, penalty):
    """logits (B, V) float; seen_ids (B, S) ids already in each sequence. Returns new logits."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen_ids)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen_ids, picked)


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set to -inf every logit outside the top_k and outside the nucleus: the smallest set of highest
    probabilities whose sum reaches top_p (the most likely token is always kept). logits (B, V) float."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # the set is already complete without this token
        drop_sorted[:, 0] = False  # the most likely token stays, even for top_p = 0
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits, cfg: SamplingConfig, seen_ids=None, generator=None):
    """One decoding decision. logits (B, V) -> (B,) ids."""
    logits = logits.float()
    if seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, cfg.repetition_penalty)
    if cfg.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def left_pad(prompts, pad_token_id=0, device=None):
    """A list of id lists -> (input_ids (B, T), attention_mask (B, T)), left-padded to the longest."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    return ids, mask


@torch.no_grad()
def stream(model, input_ids, attention_mask=None, cfg: Optional[SamplingConfig] = None, generator=None, **kw):
    """Yield the next token of every row, (B,) long, until max_new_tokens or every row has emitted eos.
    input_ids (B, T) (left-padded with attention_mask (B, T) for a ragged batch). Keyword arguments override
    fields of cfg (temperature=0.0, top_k=1, ...)."""
    cfg = replace(cfg or SamplingConfig(), **kw)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        context, T = model.config.max_position_embeddings, input_ids.shape[1]
        if T > context:
            raise ValueError(f"prompt of {T} tokens exceeds max_position_embeddings {context}")
        steps = min(cfg.max_new_tokens, context - T)  # prompt + reply fit the context
        B = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        seq, cache, feed = input_ids, None, input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(steps):
            if cfg.use_cache:
                out = model(feed, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            else:
                out = model(seq, attention_mask=mask, logits_to_keep=1)
            seen = None
            if cfg.repetition_penalty != 1.0:  # a row's own tokens: its left pads stand in for its last token
                seen = torch.where(mask.bool(), seq, seq[:, -1:])
            tok = next_token(out.logits[:, -1], cfg, seen, generator)
            tok = torch.where(done, torch.full_like(tok, cfg.pad_token_id), tok)
            yield tok
            if cfg.eos_token_id is not None:
                done = done | (tok == cfg.eos_token_id)
            if bool(done.all()):
                return
            feed = tok[:, None]
            seq = torch.cat([seq, feed], dim=1)
            mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
    finally:
        model.train(was_training)


def generate(model, input_ids, attention_mask=None, cfg: Optional[SamplingConfig] = None, generator=None, **kw):
    """The generated ids (B, new) (eos included; pad after a row's eos). See `stream` for the arguments."""
    steps = list(stream(model, input_ids, attention_mask, cfg, generator, **kw))
    if not steps:
        return input_ids.new_zeros((input_ids.shape[0], 0))
    return torch.stack(steps, dim=1)


def _device_of(model):
    return next(model.parameters()).device


def stream_text(model, tokenizer, prompt_ids, cfg: Optional[SamplingConfig] = None, generator=None,
                info: Optional[dict] = None, **kw):
    """Yield the text that follows `prompt_ids` (a list of ids) piece by piece, stopping at eos. A piece is yielded
    once its bytes decode to whole characters (byte-level BPE splits some characters). If `info` is a dict, it
    receives prompt_tokens, completion_tokens (eos excluded) and finish_reason ("stop" at eos, else "length")."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=_device_of(model))
    kw.setdefault("eos_token_id", tokenizer.eos_id)
    kw.setdefault("pad_token_id", tokenizer.pad_id)
    eos = kw["eos_token_id"]
    reply, shown, finish = [], "", "length"
    for tok in stream(model, ids, None, cfg, generator, **kw):
        t = int(tok[0])
        if t == eos:
            finish = "stop"
            break
        reply.append(t)
        text = tokenizer.decode(reply, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(reply, skip_special_tokens=True)
    if info is not None:
        info.update(prompt_tokens=ids.shape[1], completion_tokens=len(reply), finish_reason=finish)
    if len(text) > len(shown):
        yield text[len(shown):]


def stream_chat(model, tokenizer, messages, cfg: Optional[SamplingConfig] = None, generator=None,
                info: Optional[dict] = None, **kw):
    """Yield the assistant's reply to `messages` (ChatML via tokenizer.apply_chat_template) piece by piece; see
    `stream_text`."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    yield from stream_text(model, tokenizer, tokenizer.encode(prompt), cfg, generator, info, **kw)


def chat(model, tokenizer, messages, cfg: Optional[SamplingConfig] = None, generator=None, **kw) -> str:
    """The assistant's reply to `messages` (a list of {"role", "content"}), as one string."""
    return "".join(stream_chat(model, tokenizer, messages, cfg, generator, **kw))
