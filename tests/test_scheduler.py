"""minimind/scheduler.py on its own: how a Job turns tokens into text (stop sequences held back until they are
ruled out, unfinished characters waited for), how the Scheduler's queue admits, drops and fails jobs, and how its
batch works: jobs join between steps and sample what they sample alone, a cancelled or stopped job's row is freed
before the next step, and max_context bounds a job as the model's context does."""
import asyncio
import time

import pytest

from minimind.generate import SamplingConfig
from minimind.scheduler import Closed, Job, QueueFull, Scheduler, TimeLimit
from minimind.tokenizer import load_tokenizer
from tests.serve_helpers import forward_shapes, slow_down
from tests.test_chat import tiny


class Pieces:
    """A tokenizer whose token i decodes to PIECES[i]; token 0 is eos."""
    eos_id, pad_id = 0, 0
    PIECES = ["<eos>", "hel", "lo E", "N", "D more", "E", "x", "\ufffd"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def run_job(tokens, stop=()):
    """(pieces sent, finish_reason, whether push reported the end) for `tokens` pushed into a Job."""
    async def go():
        job = Job([1], SamplingConfig(), stop=stop)
        ended = False
        for t in tokens:
            if job.push(t, Pieces()):
                ended = True
                break
        if not ended:
            job.end("length")
        return [p async for p in job.pieces()], job.finish_reason, ended
    return asyncio.run(go())


def test_a_stop_sequence_is_held_back_until_it_completes_and_is_not_sent():
    pieces, reason, ended = run_job([1, 2, 3, 4], stop=["END"])
    assert pieces == ["hel", "lo "] and reason == "stop" and ended  # "E" and "EN" waited; "END" cut the reply
    # "hel" ends in "l", which may start "lo": it waits for the next token, which completes "lo"
    assert run_job([1, 2, 3, 4], stop=["never", "lo"]) == (["he", "l"], "stop", True)


def test_a_stop_prefix_that_goes_nowhere_is_sent():
    pieces, reason, _ = run_job([5, 6], stop=["END"])
    assert pieces == ["Ex"] and reason == "length"
    pieces, reason, _ = run_job([1, 5], stop=["END"])
    assert pieces == ["hel", "E"] and reason == "length"  # held back, then sent at the end


def test_eos_and_unfinished_characters():
    assert run_job([1, 0, 2]) == (["hel"], "stop", True)
    pieces, _, _ = run_job([1, 7, 6])  # "\ufffd" at the end waits for the character's other bytes
    assert pieces == ["hel", "\ufffdx"]
    assert run_job([1, 7]) == (["hel", "\ufffd"], "length", False)  # sent at the end, as decoded


@pytest.fixture
def slow_scheduler():
    model = tiny()
    slow_down(model, 0.05)
    scheduler = Scheduler(model, load_tokenizer(), max_queue=1, max_batch=1)
    yield scheduler
    scheduler.close()


def test_the_queue_admits_refuses_drops_and_fails(slow_scheduler):
    async def go():
        long = SamplingConfig(max_new_tokens=1000)
        running, waiting = Job([1, 2, 3], long), Job([1, 2, 3], long)
        slow_scheduler.submit(running)
        while running not in slow_scheduler.running:
            await asyncio.sleep(0.01)
        slow_scheduler.submit(waiting)
        with pytest.raises(QueueFull) as e:
            slow_scheduler.submit(Job([1], long))
        assert e.value.retry_after >= 1
        waiting.cancel()
        assert slow_scheduler.waiting == 0
        slow_scheduler.submit(third := Job([1], long))
        slow_scheduler.close()
        for job in (running, third):
            with pytest.raises(Closed):
                await job.text()
        with pytest.raises(Closed):
            slow_scheduler.submit(Job([1], long))
    started = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - started < 10


def decode_rows(shapes):
    """The rows of each decode forward (one token per row), in order."""
    return [rows for rows, tokens in shapes if tokens == 1]


async def forwards(shapes, n):
    while len(shapes) < n:
        await asyncio.sleep(0.005)


PROMPTS = [[1, 85, 9, 14, 3, 77], [1, 60, 61], [1, 33, 2, 90, 18, 7, 8, 9, 10]]
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0)


def test_jobs_join_the_running_batch_between_steps_and_sample_what_they_sample_alone():
    model, tokenizer = tiny(), load_tokenizer()
    shapes = forward_shapes(model)
    slow_down(model, 0.01)
    scheduler = Scheduler(model, tokenizer, max_batch=4)

    async def alone():
        replies = []
        for i, p in enumerate(PROMPTS):
            job = Job(p, SAMPLED, seed=10 + i)
            scheduler.submit(job)
            await job.text()
            replies.append((job.reply_ids, job.finish_reason))
        return replies

    async def joining():
        jobs = [Job(p, SAMPLED, seed=10 + i) for i, p in enumerate(PROMPTS)]
        for i, job in enumerate(jobs):  # the next one arrives while the others decode
            scheduler.submit(job)
            await forwards(shapes, len(shapes) + 3)
        for job in jobs:
            await job.text()
        return [(job.reply_ids, job.finish_reason) for job in jobs]
    try:
        want = asyncio.run(alone())
        assert max(decode_rows(shapes)) == 1
        shapes.clear()
        got = asyncio.run(joining())
    finally:
        scheduler.close()
    assert got == want
    assert len({tuple(ids) for ids, _ in want}) == 3 and all(len(ids) >= 6 for ids, _ in want)
    rows = decode_rows(shapes)
    assert rows[:2] == [1, 1] and 2 in rows and rows.count(3) >= 3  # joined mid-run, then all three together
    prefills = [n for n, tokens in shapes if tokens > 1]
    assert prefills == [1, 1, 1]  # each prefilled once, when it joined


def test_a_cancelled_or_stopped_job_frees_its_row_before_the_next_step():
    model, tokenizer = tiny(), load_tokenizer()
    greedy, long = SamplingConfig(max_new_tokens=12, temperature=0), SamplingConfig(max_new_tokens=1000)
    shapes = forward_shapes(model)
    slow_down(model, 0.01)
    scheduler = Scheduler(model, tokenizer, max_batch=4)

    async def go():
        probe = Job(PROMPTS[0], greedy)  # what the first prompt's reply is: the stop sequence is from its middle
        scheduler.submit(probe)
        text = await probe.text()
        assert len(text) >= 8, text
        start, stop = len(shapes), text[4:7]
        stopped, cancelled, companion = Job(PROMPTS[0], greedy, stop=[stop]), Job(PROMPTS[1], long), \
            Job(PROMPTS[2], long)
        for job in (stopped, cancelled, companion):
            scheduler.submit(job)
        assert await stopped.text() == text[:text.find(stop)] and stopped.finish_reason == "stop"
        await forwards(shapes, len(shapes) + 3)
        cancelled.cancel()
        await forwards(shapes, len(shapes) + 3)
        companion.cancel()
        while scheduler.running:
            await asyncio.sleep(0.01)
        return start, len(stopped.reply_ids)
    try:
        start, generated = asyncio.run(go())
        after = len(shapes)
        time.sleep(0.2)
        assert len(shapes) == after  # nothing left to decode
    finally:
        scheduler.close()
    rows = decode_rows(shapes[start:])
    # the stopped job decoded beside the other two until its stop sequence (its first token came from the prefill),
    # then two rows, then the companion alone: no step decodes a row whose job is over
    assert rows[:generated - 1] == [3] * (generated - 1)
    rest = rows[generated - 1:]
    assert rest == sorted(rest, reverse=True) and set(rest) == {2, 1}


def test_max_context_bounds_a_job_as_the_models_context_does():
    model = tiny()
    scheduler = Scheduler(model, load_tokenizer(), max_context=8)
    assert scheduler.max_context == 8 and scheduler.engine.cache.k.shape[2] == 8
    assert Scheduler(model, load_tokenizer(), max_context=10 ** 6).max_context == model.config.max_position_embeddings

    async def go():
        fits, too_long = Job([1] * 5, SamplingConfig(max_new_tokens=10, temperature=0)), Job([1] * 8, SAMPLED)
        nothing = Job([1] * 5, SamplingConfig(max_new_tokens=0))
        for job in (fits, too_long, nothing):
            scheduler.submit(job)
        await fits.text()
        with pytest.raises(ValueError, match="max_len is 8"):
            await too_long.text()
        assert await nothing.text() == "" and nothing.finish_reason == "length"
        return fits
    try:
        fits = asyncio.run(go())
    finally:
        scheduler.close()
    assert len(fits.reply_ids) == 3 and fits.finish_reason == "length"  # the reply ends at the context's end


def test_a_job_past_its_deadline_leaves_the_batch_even_unread():
    model = tiny()
    slow_down(model, 0.01)
    scheduler = Scheduler(model, load_tokenizer())

    async def go():
        job = Job(PROMPTS[0], SamplingConfig(max_new_tokens=10 ** 6), deadline=time.monotonic() + 0.3)
        scheduler.submit(job)
        while job not in scheduler.running:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        while scheduler.running:  # nobody reads the job: the model's thread drops it by itself
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.01)
        with pytest.raises(TimeLimit):
            await job.text()
    try:
        asyncio.run(go())
    finally:
        scheduler.close()
