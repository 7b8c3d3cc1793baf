"""The model's own thread: requests wait in a bounded queue, the thread generates them, and each request's text comes
back to the event loop through its Job.

    scheduler = Scheduler(model, tokenizer, max_queue=64)
    job = Job(prompt_ids, sampling, seed=7, stop=["\\n\\n"], deadline=time.monotonic() + 300)
    scheduler.submit(job)            # QueueFull when max_queue jobs are already waiting; Closed after close()
    async for piece in job.pieces(): ...   # then job.finish_reason ("stop" | "length") and job.reply_ids
    job.cancel()                     # the client went away: out of the queue, or stopped before its next token

Only the thread touches the model. The event loop only enqueues and reads: a Job's events cross threads through
`loop.call_soon_threadsafe`, so a long generation never blocks the server. A Job turns tokens into text itself
(`push`: bytes of a character split across tokens wait for the rest; a stop sequence ends the reply and is not sent,
and text that may be the start of one is held back until it is not), so the thread hands it token ids only.
Today the thread generates one job at a time (`_generate`, on the KV cache via generate.stream); a batched engine
that admits waiting jobs between steps replaces `_loop` and `_generate` and nothing else.
"""
import asyncio
import collections
import math
import threading
import time
from typing import List, Optional, Sequence

import torch

from minimind.generate import SamplingConfig, stream


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
        """Stop this job: it leaves the queue, or the model's thread stops it before its next token."""
        self.cancelled = True
        if self._scheduler is not None:
            self._scheduler._discard(self)


class Scheduler:
    """Owns the model and its thread; `max_queue` jobs may wait while one is generated."""

    def __init__(self, model, tokenizer, max_queue: int = 64):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.device = next(model.parameters()).device
        self.running: Optional[Job] = None
        self._waiting: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._seconds_per_job = 1.0  # a running average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="minimind-model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def check_room(self):
        """Raise QueueFull (or Closed) now if a job submitted now would be refused."""
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(len(self._waiting), max(1, math.ceil(self._seconds_per_job)))

    def submit(self, job: Job):
        with self._cond:
            self.check_room()
            job._scheduler = self
            self._waiting.append(job)
            self._cond.notify()

    def close(self, timeout: float = 10.0):
        """Refuse new jobs, fail the waiting ones with Closed, stop the running one, and wait for the thread."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self.running is not None:
                self.running.cancelled = True
                self.running.fail(Closed("the server is shutting down"))
            self._cond.notify()
        for job in waiting:
            job.fail(Closed("the server is shutting down"))
        self._thread.join(timeout)

    def _discard(self, job: Job):
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def _loop(self):
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self.running = self._waiting.popleft()
            started = time.monotonic()
            try:
                self._generate(job)
            except Exception as e:  # a failure inside the model fails this job, not the thread
                job.fail(e)
            finally:
                with self._cond:
                    self.running = None
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)

    def _generate(self, job: Job):
        """One job alone, token by token on the KV cache, until eos, a stop sequence, max_new_tokens, the end of
        the context, or cancellation."""
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        generator = None if job.seed is None else torch.Generator(device=self.device).manual_seed(job.seed % 2 ** 64)
        tokens = stream(self.model, ids, None, job.sampling, generator, eos_token_id=self.tokenizer.eos_id,
                        pad_token_id=self.tokenizer.pad_id)
        try:
            for token in tokens:
                if job.cancelled or job.push(int(token[0]), self.tokenizer):
                    return
            job.end("length")
        finally:
            tokens.close()
