"""minimind/scheduler.py on its own: how a Job turns tokens into text (stop sequences held back until they are
ruled out, unfinished characters waited for) and how the Scheduler's queue admits, drops and fails jobs."""
import asyncio
import time

import pytest

from minimind.generate import SamplingConfig
from minimind.scheduler import Closed, Job, QueueFull, Scheduler
from minimind.tokenizer import load_tokenizer
from tests.serve_helpers import slow_down
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
    scheduler = Scheduler(model, load_tokenizer(), max_queue=1)
    yield scheduler
    scheduler.close()


def test_the_queue_admits_refuses_drops_and_fails(slow_scheduler):
    async def go():
        long = SamplingConfig(max_new_tokens=1000)
        running, waiting = Job([1, 2, 3], long), Job([1, 2, 3], long)
        slow_scheduler.submit(running)
        while slow_scheduler.running is not running:
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
