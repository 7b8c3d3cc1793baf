"""The model's own thread: requests wait in a bounded queue, the thread generates them together in one batch, and
each request's text comes back to the event loop through its Job.

    scheduler = Scheduler(model, tokenizer, max_queue=64, max_batch=16, max_context=4096)
    job = Job(prompt_ids, sampling, seed=7, stop=["\\n\\n"], deadline=time.monotonic() + 300)
    scheduler.submit(job)            # QueueFull when max_queue jobs are already waiting; Closed after close()
    async for piece in job.pieces(): ...   # then job.finish_reason ("stop" | "length") and job.reply_ids
    job.cancel()                     # the client went away: out of the queue, or its row stops before the next step

Only the thread touches the model. It owns a generation engine (minimind/generate.py: a KV cache of max_batch rows
of max_context tokens) and loops: drop the rows of cancelled jobs and of jobs past their deadline, move waiting jobs
into the free rows, then one engine step (one batched forward decodes a token for every running job; the jobs just
admitted are prefilled and get their first token). So a request joins the running batch between steps and leaves
it when it ends, and a job samples what it would alone: its own seed, whatever runs beside it.
The event loop only enqueues and reads: a Job's events cross threads through `loop.call_soon_threadsafe`, so a long
generation never blocks the server. A Job turns tokens into text itself (`push`: bytes of a character split across
tokens wait for the rest; a stop sequence ends the reply and is not sent, and text that may be the start of one is
held back until it is not), so the thread hands it token ids only.
"""
import asyncio
import collections
import math
import threading
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from minimind.generate import Engine, SamplingConfig, row_seeds


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are already waiting for the model")
        self.retry_after = retry_after  # seconds until a place in the queue is likely free


class Closed(Exception):
    """The scheduler was closed (the server is shutting down)."""


class TimeLimit(Exception):
    """The job's deadline passed before its reply was done."""


class Job:
    """One request: its prompt and sampling, the reply so far, and the events that carry the reply to the event
    loop. Create it on the event loop (it binds to the running loop)."""

    def __init__(self, prompt_ids: Sequence[int], sampling: SamplingConfig, seed: Optional[int] = None,
                 stop: Sequence[str] = (), deadline: float = math.inf):
        self.prompt_ids, self.sampling, self.seed, self.stop = list(prompt_ids), sampling, seed, list(stop)
        self.deadline = deadline  # time.monotonic() by which the reply must be done
        self.cancelled = False
        self.finish_reason: Optional[str] = None
        self.reply_ids: List[int] = []  # generated ids, eos excluded
        self._text, self._sent = "", 0  # the reply decoded so far; how many of its characters were sent
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._scheduler: Optional["Scheduler"] = None

    # ---- called by the model's thread ----
    def push(self, token: int, tokenizer) -> bool:
        """Take the next generated token and send the text it completes. True when the reply is over (eos or a
        stop sequence; finish_reason "stop")."""
        if token == tokenizer.eos_id:
            return self.end("stop")
        self.reply_ids.append(token)
        text = self._text = tokenizer.decode(self.reply_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
            return False
        hits = [i for i in (text.find(s, self._sent) for s in self.stop) if i >= 0]
        if hits:
            self._text = text[:min(hits)]
            return self.end("stop")
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._send_text(len(text) - held)
        return False

    def end(self, finish_reason: str) -> bool:
        """The reply is complete: send what is left of it (held-back text, an unfinished character), then the
        end."""
        self._send_text(len(self._text))
        self.finish_reason = finish_reason
        self._emit("done", None)
        return True

    def fail(self, error: BaseException):
        self._emit("failed", error)

    def _send_text(self, upto: int):
        if upto > self._sent:
            self._emit("text", self._text[self._sent:upto])
            self._sent = upto

    def _emit(self, kind, value):
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass

    # ---- called on the event loop ----
    async def pieces(self):
        """The reply's text, piece by piece as it is generated. Raises TimeLimit at the deadline (the job is
        cancelled), Closed if the server shuts down, and the model's exception if generation failed."""
        while True:
            left = self.deadline - time.monotonic()
            try:
                kind, value = await asyncio.wait_for(self._events.get(), None if math.isinf(left) else left)
            except asyncio.TimeoutError:
                self.cancel()
                raise TimeLimit("the time limit ran out before the reply was done") from None
            if kind == "text":
                yield value
            elif kind == "done":
                return
            else:
                raise value

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    def cancel(self):
        """Stop this job: it leaves the queue, or the model's thread frees its row before the next step."""
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._discard(self)


class Scheduler:
    """Owns the model, its engine and its thread: up to `max_batch` jobs generate together, each in at most
    `max_context` tokens, prompt and reply (None, or more than the model's context: the model's context), while
    `max_queue` more wait. The engine's KV cache holds max_batch x max_context tokens from the start."""

    def __init__(self, model, tokenizer, max_queue: int = 64, max_batch: int = 16, max_context: Optional[int] = None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        context = model.config.max_position_embeddings
        max_context = context if max_context is None else min(max_context, context)
        self.engine = Engine(model.eval(), max_batch, max_context)  # (it checks both)
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.max_batch, self.max_context, self.device = max_batch, self.engine.max_len, self.engine.device
        self._running: Dict[int, Tuple[Job, float]] = {}  # engine request -> (its job, when it was admitted)
        self._waiting: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._seconds_per_job = 1.0  # a running average from admission to the end, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="minimind-model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> List[Job]:
        """The jobs being generated now (in the engine's batch)."""
        with self._cond:
            return [job for job, _ in self._running.values()]

    def kv_cache_bytes(self) -> int:
        cache = self.engine.cache
        return cache.k.nbytes + cache.v.nbytes

    def check_room(self):
        """Raise QueueFull (or Closed) now if a job submitted now would be refused."""
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                # a place in the queue frees when a running job ends: one of len(running) jobs of ~seconds_per_job
                seconds = self._seconds_per_job / max(1, len(self._running))
                raise QueueFull(len(self._waiting), max(1, math.ceil(seconds)))

    def submit(self, job: Job):
        with self._cond:
            self.check_room()
            job._scheduler = self
            self._waiting.append(job)
            self._cond.notify()

    def close(self, timeout: float = 10.0):
        """Refuse new jobs, fail the waiting and the running ones with Closed, and wait for the thread."""
        with self._cond:
            self._closed = True
            jobs = list(self._waiting) + [job for job, _ in self._running.values()]
            self._waiting = collections.deque()
            for job in jobs:
                job.cancelled = True
            self._cond.notify()
        for job in jobs:
            job.fail(Closed("the server is shutting down"))
        self._thread.join(timeout)

    def _discard(self, job: Job):
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._running and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._drop_stopped()
                admitted = [self._waiting.popleft() for _ in range(min(len(self._waiting),
                                                                       self.max_batch - len(self._running)))]
            for job in admitted:
                self._admit(job)
            if not self._running:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failure inside the model fails the jobs of this step, not the thread
                with self._cond:
                    for request, (job, _) in list(self._running.items()):
                        self._leave(request, cancel=True)
                        job.fail(e)
                continue
            for event in events:
                entry = self._running.get(event.request)
                if entry is None:
                    continue
                job = entry[0]
                if job.cancelled:  # (its row is freed before the next step)
                    continue
                if job.push(event.token, self.tokenizer):  # its eos, or a stop sequence the engine cannot see
                    self._leave(event.request, cancel=not event.finished)
                elif event.finished:
                    job.end("length")
                    self._leave(event.request)

    def _drop_stopped(self):
        """Free the rows of the jobs that were cancelled or ran past their deadline (TimeLimit, which the job's
        reader also raises by itself at the deadline)."""
        now = time.monotonic()
        for request, (job, _) in list(self._running.items()):
            if job.cancelled or now >= job.deadline:
                self._leave(request, cancel=True)
                if not job.cancelled:
                    job.fail(TimeLimit("the time limit ran out before the reply was done"))

    def _admit(self, job: Job):
        """Give the job a row at the next step, sampling as `stream` would for it alone: its seed as the chat
        command's --seed (a generator seeded with it draws the row's seed)."""
        if job.cancelled:
            return
        cfg = replace(job.sampling, eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id)
        if cfg.max_new_tokens == 0:
            job.end("length")
            return
        seed = None
        if job.seed is not None:
            seed = row_seeds(1, torch.Generator(device=self.device).manual_seed(job.seed % 2 ** 64))[0]
        try:
            request = self.engine.add(job.prompt_ids, cfg, seed)
        except Exception as e:  # a prompt the engine cannot take (too long for max_context, an id off the vocab)
            job.fail(e)
            return
        with self._cond:
            self._running[request] = (job, time.monotonic())

    def _leave(self, request: int, cancel: bool = False):
        """The job of `request` is over: out of the running set (and its row freed when `cancel`)."""
        if cancel:
            self.engine.cancel(request)
        with self._cond:
            _, admitted = self._running.pop(request)
        self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - admitted)
