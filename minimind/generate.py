"""Text generation: one engine for every caller (generate, chat, the server, RL rollouts), on the KV cache.

    engine = Engine(model, max_batch=16, max_len=1024)
    request = engine.add(prompt_ids, SamplingConfig(temperature=0.8), seed=7)  # waits for a free row
    while engine.busy:
        for event in engine.step():  # event.request, .token, .logprob, .finish_reason (None, "stop", "length")
            ...

Each running request owns a row of the KV cache (minimind/kv_cache.py), its sampling settings and its own
torch.Generator. A step decodes every running row (one batched forward, one token each), then prefills the
requests waiting for a row (one right-padded forward, which gives their first token). A request joins between steps
and leaves as soon as it finishes: at its eos (<|im_end|> = 2: "stop"), or after max_new_tokens or at the engine's
max_len ("length"). The running rows stay packed at the front of the cache, so a finished row costs nothing. A row
samples as it would alone: same prompt and seed, same tokens, whatever runs beside it.

One decision per row (`sample`): logits -> repetition penalty -> / temperature -> top_k -> top_p -> a draw with the
row's generator (one uniform u per token: the first token whose cumulative probability exceeds u), or the argmax
when greedy. Each token comes with the policy's log-prob at temperature 1, log_softmax(logits)[token]
of the raw logits, from the same forward: the "old" log-probs of RL, with no second pass.

On the engine:
    rollout(model, prompts, num_generations, ...) -> Rollout   ids, completion mask, log-probs (RL, batch jobs)
    generate(model, input_ids, ...) -> (B, new) ids              stream(...) yields one (B,) tensor per step
    stream_text(model, tokenizer, prompt_ids, ...) yields text pieces as they become valid UTF-8
    stream_chat(model, tokenizer, messages, ...)   the same for the assistant's reply to a conversation
    chat(model, tokenizer, messages, ...) -> str   the assistant's reply
SamplingConfig(use_cache=False) has the engine recompute every running sequence in full at each step instead of
reading the cache: the reference path, for tests.
"""
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from minimind.kv_cache import KVCache


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


def apply_repetition_penalty(logits, seen, penalty):
    """CTRL-style: a seen token's logit is divided by the penalty when positive, multiplied when negative.
    logits (B, V) float; seen (B, V) bool, the tokens already in each sequence; penalty a number or (B,) per row."""
    penalty = torch.as_tensor(penalty, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits, top_k=0, top_p=1.0, candidates=64):
    """Set to -inf every logit outside the top_k (ties with the k-th kept) and then outside the nucleus: the smallest
    set of highest probabilities whose sum reaches top_p (the most likely token always stays). logits (B, V) float;
    top_k, top_p: numbers for every row, or (B,) tensors, one per row (top_k 0 and top_p 1 = off).
    The set is looked for among each row's `candidates` highest logits (a topk, not a sort of the vocabulary); when
    some row's set does not close there, among all of them."""
    B, V = logits.shape
    k = torch.as_tensor(top_k, device=logits.device).expand(B)
    p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(B)
    k = torch.where((k > 0) & (k < V), k, V)
    unfiltered = (k == V) & (p >= 1)
    n = min(V, max([candidates] + [2 * x for x in k[k < V].tolist()]))
    while True:
        vals, order = logits.topk(n, dim=-1) if n < V else logits.sort(dim=-1, descending=True)
        kth = torch.where(k <= n, vals.gather(1, (k.clamp(max=n) - 1)[:, None]).squeeze(1), float("-inf"))[:, None]
        lse = logits.masked_fill(logits < kth, float("-inf")).logsumexp(dim=-1, keepdim=True)
        probs = (vals - lse).exp().masked_fill(vals < kth, 0.0)
        mass = probs.cumsum(dim=-1)
        drop = (vals < kth) | ((mass - probs >= p[:, None]) & (p[:, None] < 1))  # complete without this token
        drop[:, 0] = False
        # a row's set is inside the candidates when its nucleus closes there, or when its top_k does and no tie
        # with the k-th logit is left outside
        inside = ((p < 1) & (mass[:, -1] >= p)) | ((k <= n) & (vals[:, -1] < kth[:, 0])) | unfiltered
        if n == V or bool(inside.all()):
            break
        n = V  # some row's nucleus reaches past the candidates
    out = torch.full_like(logits, float("-inf")).scatter(1, order, vals.masked_fill(drop, float("-inf")))
    return torch.where(unfiltered[:, None], logits, out)


class BatchSampling:
    """The sampling settings of a batch of rows as tensors (B,), built once per batch; generators: one
    torch.Generator per row (None for a greedy row)."""

    def __init__(self, cfgs: Sequence["SamplingConfig"], generators, device):
        self.generators = list(generators)
        greedy = [c.temperature < GREEDY_BELOW for c in cfgs]
        self.all_greedy, self.any_greedy = all(greedy), any(greedy)
        self.greedy = torch.tensor(greedy, device=device)
        self.temperature = torch.tensor([1.0 if g else c.temperature for c, g in zip(cfgs, greedy)], device=device)
        self.top_k = torch.tensor([c.top_k for c in cfgs], device=device)
        self.top_p = torch.tensor([c.top_p for c in cfgs], device=device)
        self.filtered = any(not g and (c.top_k > 0 or c.top_p < 1) for c, g in zip(cfgs, greedy))
        self.penalty = torch.tensor([c.repetition_penalty for c in cfgs], device=device)
        self.penalized = any(c.repetition_penalty != 1.0 for c in cfgs)


def sample(logits, settings: BatchSampling, seen=None):
    """One decision per row: logits (B, V) raw -> (tokens (B,) long, log-probs (B,) float32). The log-prob is
    log_softmax(logits)[token] of the raw logits: temperature 1, before any penalty or filter. seen (B, V) bool: the
    tokens in each row's sequence (needed with a repetition penalty)."""
    raw = logits.float()
    x = apply_repetition_penalty(raw, seen, settings.penalty) if settings.penalized else raw
    if settings.all_greedy:
        tokens = x.argmax(dim=-1)
    else:
        x = x / settings.temperature[:, None]
        if settings.filtered:
            x = filter_logits(x, settings.top_k, settings.top_p)
        cdf = x.softmax(dim=-1).cumsum(dim=-1)
        total = cdf[:, -1:]
        u = torch.stack([torch.rand((), generator=g, device=x.device) if g is not None else x.new_zeros(())
                         for g in settings.generators])[:, None]
        # the first token whose cumulative probability exceeds u * total (u < 1, and kept below total in float,
        # so a token of probability 0 is never the one)
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
        if settings.any_greedy:
            tokens = torch.where(settings.greedy, x.argmax(dim=-1), tokens)
    logprobs = raw.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


class Event(NamedTuple):
    """One token of one request, from Engine.step."""
    request: int
    token: int
    logprob: float  # log_softmax(logits)[token], temperature 1
    finish_reason: Optional[str]  # None while the request runs; "stop" (its eos) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Request:
    def __init__(self, handle, prompt, cfg, generator, max_new):
        self.handle, self.cfg, self.generator, self.max_new = handle, cfg, generator, max_new
        self.tokens, self.prompt_len, self.finish_reason = prompt, len(prompt), None


class Engine:
    """Batched generation on a KV cache of max_batch rows of max_len tokens (default: the model's context), where
    requests join and leave between steps. use_cache=False recomputes every sequence in full at each step (the
    reference path). dtype: the cache's (default the model's parameters'). The model should be in eval mode
    (rollout and stream switch it there and back)."""

    def __init__(self, model, max_batch: int = 1, max_len: Optional[int] = None, use_cache: bool = True,
                 dtype: Optional[torch.dtype] = None):
        model = getattr(model, "module", model)  # a DDP wrapper
        context = model.config.max_position_embeddings
        max_len = context if max_len is None else max_len
        if not 1 <= max_len <= context:
            raise ValueError(f"max_len must be in [1, max_position_embeddings = {context}], got {max_len}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        param = next(model.parameters())
        self.model, self.max_batch, self.max_len, self.device = model, max_batch, max_len, param.device
        self.cache = KVCache(model.config, max_batch, max_len, dtype or param.dtype, param.device) if use_cache \
            else None
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=param.device)
        self.rows: List[_Request] = []  # the running requests; rows[b] owns row b of the cache
        self.waiting = deque()
        self._settings = None  # BatchSampling of self.rows, rebuilt when they change
        self._handles = 0

    @property
    def busy(self) -> bool:
        """Whether a request is running or waiting."""
        return bool(self.rows or self.waiting)

    def add(self, prompt, cfg: Optional["SamplingConfig"] = None, seed: Optional[int] = None) -> int:
        """Queue a request: prompt (token ids), its sampling settings, and a seed for its draws (None: one drawn
        from torch's global generator). Returns its handle; it starts at the first step with a free row."""
        cfg = cfg or SamplingConfig()
        prompt = prompt.tolist() if torch.is_tensor(prompt) else [int(t) for t in prompt]
        vocab, context = self.model.config.vocab_size, self.model.config.max_position_embeddings
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, vocab_size = {vocab}), got {min(prompt)}..{max(prompt)}")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for a reply: the engine's max_len is "
                             f"{self.max_len} (max_position_embeddings {context})")
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 for a request, got {cfg.max_new_tokens}")
        generator = None
        if cfg.temperature >= GREEDY_BELOW:
            seed = int(torch.randint(0, 2 ** 62, ())) if seed is None else seed
            generator = torch.Generator(self.device).manual_seed(seed)
        self._handles += 1
        self.waiting.append(_Request(self._handles, prompt, cfg, generator,
                                     min(cfg.max_new_tokens, self.max_len - len(prompt))))
        return self._handles

    def cancel(self, request: int):
        """Drop a waiting or running request (its client went away): no more events for it."""
        for r in self.waiting:
            if r.handle == request:
                self.waiting.remove(r)
                return
        for r in self.rows:
            if r.handle == request:
                r.finish_reason = "cancelled"  # its row is freed at the next step

    @torch.no_grad()
    def step(self) -> List[Event]:
        """Decode one token for every running request, then start the waiting ones that fit (their first token).
        Returns one Event per token, in row order (running rows first)."""
        self._retire()
        events = []
        if self.rows:
            events += self._advance(0, len(self.rows), prefill=False)
            self._retire()
        start = len(self.rows)
        if self.waiting and start < self.max_batch:
            new = [self.waiting.popleft() for _ in range(min(self.max_batch - start, len(self.waiting)))]
            for b, r in enumerate(new, start):
                self.seen[b] = False
                self.seen[b, torch.tensor(r.tokens, device=self.device)] = True
            self.rows += new
            self._settings = None
            events += self._advance(start, len(new), prefill=True)
            self._retire()
        return events

    def _advance(self, start, n, prefill):
        """One forward over rows start .. start + n, one sampled token each."""
        rows, model = self.rows[start:start + n], self.model
        if self.cache is not None and not prefill:
            self.cache.decode(n)
            ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
            last = model.model(ids, cache=self.cache)[0][:, 0]
        else:  # a prefill, or the reference path: whole sequences, right-padded
            lengths = [len(r.tokens) for r in rows]
            ids = torch.zeros(n, max(lengths), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, :lengths[b]] = torch.tensor(r.tokens)
            if self.cache is not None:
                self.cache.prefill(start, lengths)
            hidden = model.model(ids.to(self.device), cache=self.cache)[0]
            last = hidden[torch.arange(n, device=self.device), torch.tensor(lengths, device=self.device) - 1]
        if prefill or self._settings is None:
            settings = BatchSampling([r.cfg for r in rows], [r.generator for r in rows], self.device)
            if not prefill:
                self._settings = settings
        else:
            settings = self._settings
        seen = self.seen[start:start + n]
        tokens, logprobs = sample(model.lm_head(last), settings, seen)
        seen.scatter_(1, tokens[:, None], True)
        events = []
        for r, t, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
            r.tokens.append(t)
            if r.cfg.eos_token_id is not None and t == r.cfg.eos_token_id:
                r.finish_reason = "stop"
            elif len(r.tokens) - r.prompt_len >= r.max_new:
                r.finish_reason = "length"
            events.append(Event(r.handle, t, lp, r.finish_reason))
        return events

    def _retire(self):
        """Free the rows of finished requests: the last running row moves into each, keeping rows 0 .. n-1."""
        for b in reversed(range(len(self.rows))):
            if self.rows[b].finish_reason is None:
                continue
            last = len(self.rows) - 1
            if b != last:
                self.rows[b] = self.rows[last]
                self.seen[b] = self.seen[last]
                if self.cache is not None:
                    self.cache.move(last, b)
            self.rows.pop()
            self._settings = None


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def row_seeds(n, generator=None):
    """n seeds for per-row generators, drawn from generator (None: torch's global one). stream, generate and chat
    give row b the seed row_seeds(B, generator)[b], and Engine.add(..., seed) takes one."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2 ** 62, (n,), generator=generator, device=device).tolist()


@dataclass
class Rollout:
    """Completions of a batch of prompts; row i answers prompts[i]."""
    prompts: List[List[int]]
    completions: torch.Tensor  # (N, L) long: the sampled tokens, right-padded with pad_token_id
    completion_mask: torch.Tensor  # (N, L) bool: the sampled tokens (through the first eos, inclusive)
    logprobs: torch.Tensor  # (N, L) float32: log_softmax(logits)[token] at temperature 1; 0 off the mask
    finish_reasons: List[str]  # "stop" (eos) or "length"

    def sequences(self, pad_token_id=0):
        """(input_ids (N, T), labels (N, T)): each row's prompt then completion, right-padded; labels are the
        completion tokens where they stand in input_ids and -100 elsewhere, so model.token_logprobs(input_ids,
        labels) gives the completions' log-probs at the same places."""
        lengths = self.completion_mask.sum(dim=1).tolist()
        T = max(len(p) + n for p, n in zip(self.prompts, lengths))
        device = self.completions.device
        ids = torch.full((len(self.prompts), T), pad_token_id, dtype=torch.long, device=device)
        labels = torch.full_like(ids, -100)
        for i, (p, n) in enumerate(zip(self.prompts, lengths)):
            ids[i, :len(p)] = torch.tensor(p, device=device)
            ids[i, len(p):len(p) + n] = labels[i, len(p):len(p) + n] = self.completions[i, :n]
        return ids, labels


@torch.no_grad()
def rollout(model, prompts, num_generations: int = 1, cfg: Union["SamplingConfig", Sequence["SamplingConfig"],
            None] = None, generator=None, seeds=None, max_batch: Optional[int] = None) -> Rollout:
    """num_generations completions of every prompt (a list of token-id lists), rows p * G + g, all decoding together
    (or max_batch rows at a time, a finished row's place going to the next). cfg: one SamplingConfig, or one per
    prompt. seeds: one per row, else drawn from generator (None: torch's global generator), so the generator's
    state reproduces the rollout."""
    G = num_generations
    if G < 1:
        raise ValueError(f"num_generations must be >= 1, got {G}")
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg or SamplingConfig()] * len(prompts)
    if len(cfgs) != len(prompts):
        raise ValueError(f"{len(cfgs)} sampling configs for {len(prompts)} prompts")
    rows = [(list(p), c) for p, c in zip(prompts, cfgs) for _ in range(G)]
    if not rows:
        raise ValueError("rollout needs at least one prompt")
    seeds = row_seeds(len(rows), generator) if seeds is None else list(seeds)
    if len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows ({len(prompts)} prompts x {G})")
    model = getattr(model, "module", model)
    context = model.config.max_position_embeddings
    engine = Engine(model, max_batch or len(rows), min(context, max(len(p) + c.max_new_tokens for p, c in rows)))
    out = {engine.add(p, c, s): i for i, ((p, c), s) in enumerate(zip(rows, seeds))}
    tokens, logprobs, reasons = [[] for _ in rows], [[] for _ in rows], [None] * len(rows)
    with _eval_mode(model):
        while engine.busy:
            for ev in engine.step():
                i = out[ev.request]
                tokens[i].append(ev.token)
                logprobs[i].append(ev.logprob)
                reasons[i] = ev.finish_reason
    L = max(len(t) for t in tokens)
    completions = torch.tensor([t + [c.pad_token_id] * (L - len(t)) for t, (_, c) in zip(tokens, rows)])
    mask = torch.tensor([[j < len(t) for j in range(L)] for t in tokens])
    lp = torch.tensor([x + [0.0] * (L - len(x)) for x in logprobs], dtype=torch.float32)
    device = engine.device
    return Rollout([p for p, _ in rows], completions.to(device), mask.to(device), lp.to(device), reasons)


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
    """Yield the next token of every row, (B,) long, until every row has finished (its eos, max_new_tokens, or the
    context); a finished row yields pad_token_id. input_ids (B, T); for a ragged batch, left- or right-padded with
    attention_mask (B, T): each row generates what it would alone. Each row's draws come from its own seed, drawn
    from generator (None: torch's global generator). Keyword arguments override fields of cfg (temperature=0.0,
    top_k=1, ...)."""
    cfg = replace(cfg or SamplingConfig(), **kw)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
    model = getattr(model, "module", model)
    context, (B, T) = model.config.max_position_embeddings, input_ids.shape
    if T > context:
        raise ValueError(f"prompt of {T} tokens exceeds max_position_embeddings {context}")
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prompts = [row[m].tolist() for row, m in zip(input_ids, keep)]
    if not all(prompts):
        raise ValueError(f"rows {[b for b, p in enumerate(prompts) if not p]} of attention_mask have no tokens")
    seeds = row_seeds(B, generator)
    max_len = min(context, max(len(p) for p in prompts) + cfg.max_new_tokens)
    engine, row_of = Engine(model, B, max_len, cfg.use_cache), {}
    for b, (p, seed) in enumerate(zip(prompts, seeds)):
        if cfg.max_new_tokens > 0 and len(p) < max_len:  # else this row has no room: it yields pads only
            row_of[engine.add(p, cfg, seed)] = b
    with _eval_mode(model):
        while engine.busy:
            tok = [cfg.pad_token_id] * B
            for ev in engine.step():
                tok[row_of[ev.request]] = ev.token
            yield torch.tensor(tok, device=input_ids.device)


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
