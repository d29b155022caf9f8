"""The batch loop with a recording stand-in for the pipeline (no Ray, no torch): what runs
together, the idle wait, cancellation of queued jobs, failures, live reconfiguration."""

import asyncio

import pytest

from serve_app.batch_loop import BatchLoop
from tests.conftest import make_job


class Pipeline:
    """Records each call's request ids; each call takes `seconds`; a width of 13 fails."""

    def __init__(self, seconds=0.05):
        self.calls, self.seconds = [], seconds

    async def __call__(self, jobs):
        self.calls.append([job.request_id for job in jobs])
        await asyncio.sleep(self.seconds)
        if jobs[0].width == 13:
            raise RuntimeError("simulated out of memory")
        return [f"images of {job.request_id}" for job in jobs]


def job(name, width=64, n=1):
    return make_job(request_id=name, width=width, seeds=tuple(range(n)))


def run(scenario):
    return asyncio.run(scenario())


def test_an_idle_loop_waits_for_company_then_runs_one_call():
    pipeline = Pipeline()

    async def scenario():
        loop = BatchLoop(pipeline, max_images=8, wait_s=0.2)
        first = asyncio.create_task(loop.submit(job("a")))
        await asyncio.sleep(0.05)  # within the wait: b joins a's call
        return await asyncio.gather(first, loop.submit(job("b")))

    assert run(scenario) == ["images of a", "images of b"]
    assert pipeline.calls == [["a", "b"]]


def test_a_full_call_does_not_wait_out_the_timeout():
    pipeline = Pipeline()

    async def scenario():
        loop = BatchLoop(pipeline, max_images=2, wait_s=30)
        return await asyncio.wait_for(
            asyncio.gather(loop.submit(job("a")), loop.submit(job("b"))), 5
        )

    assert len(run(scenario)) == 2 and pipeline.calls == [["a", "b"]]


def test_jobs_arriving_during_a_call_all_ride_the_next_one():
    pipeline = Pipeline(seconds=0.2)

    async def scenario():
        loop = BatchLoop(pipeline, max_images=8, wait_s=0)
        first = asyncio.create_task(loop.submit(job("first")))
        await asyncio.sleep(0.05)  # "first" is running now
        later = [asyncio.create_task(loop.submit(job(f"later-{i}"))) for i in range(3)]
        await asyncio.sleep(0.01)
        incompatible = asyncio.create_task(loop.submit(job("wide", width=128)))
        await asyncio.gather(first, *later, incompatible)

    run(scenario)
    assert pipeline.calls == [["first"], ["later-0", "later-1", "later-2"], ["wide"]]


def test_a_cancelled_queued_job_never_runs():
    pipeline = Pipeline(seconds=0.2)

    async def scenario():
        loop = BatchLoop(pipeline, max_images=8, wait_s=0)
        first = asyncio.create_task(loop.submit(job("first")))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(loop.submit(job("gone")))
        kept = asyncio.create_task(loop.submit(job("kept")))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(first, kept)
        return loop.queued_jobs

    assert run(scenario) == 0
    assert pipeline.calls == [["first"], ["kept"]]


def test_a_failing_call_fails_only_its_own_jobs():
    pipeline = Pipeline()

    async def scenario():
        loop = BatchLoop(pipeline, max_images=8, wait_s=0.1)
        return await asyncio.gather(
            loop.submit(job("ok")), loop.submit(job("bad", width=13)), return_exceptions=True
        )

    ok, bad = run(scenario)
    assert ok == "images of ok" and isinstance(bad, RuntimeError)


def test_a_call_must_answer_every_job():
    async def short(jobs):
        return ["only one"]

    async def scenario():
        loop = BatchLoop(short, max_images=8, wait_s=0.1)
        return await asyncio.gather(
            loop.submit(job("a")), loop.submit(job("b")), return_exceptions=True
        )

    results = run(scenario)
    message = "1 outcomes for 2 requests"
    assert all(isinstance(r, RuntimeError) and message in str(r) for r in results)


def test_reconfigure_applies_to_the_next_call_and_oversized_jobs_are_refused():
    pipeline = Pipeline()

    async def scenario():
        loop = BatchLoop(pipeline, max_images=8, wait_s=0.1)
        loop.configure(max_images=1, wait_s=0.1)
        await asyncio.gather(loop.submit(job("a")), loop.submit(job("b")))
        with pytest.raises(ValueError, match="exceeds the 1 a call may hold"):
            await loop.submit(job("big", n=2))

    run(scenario)
    assert pipeline.calls == [["a"], ["b"]]
