"""The model deployment class without Ray: token limits, failure isolation, health."""

import asyncio
import time

import pytest

from serve_app.contract import APIError
from serve_app.engine import ImageEngine
from serve_app.model import ImageModel
from tests.conftest import make_job
from tests.unit.conftest import Recorder

BROKEN_WIDTH = 128


class EngineBrokenForOneSize(ImageEngine):
    """The real tiny engine, except that one geometry fails (a stand-in for e.g. an OOM)."""

    def generate(self, jobs, step_callback=None):
        if jobs[0].width == BROKEN_WIDTH:
            raise RuntimeError("simulated CUDA out of memory")
        return super().generate(jobs, step_callback)


@pytest.fixture(scope="module")
def model(tiny_cache_dir):
    config = {
        "id": "tiny",
        "source": "tiny",
        "cache_dir": tiny_cache_dir,
        "max_sequence_length": 16,
        "warmup_sizes": ["64x64"],
    }
    return ImageModel(config, engine_cls=EngineBrokenForOneSize)


def job(name, width=64, seeds=(1,)):
    return make_job(request_id=name, width=width, seeds=seeds)


def test_prompt_over_the_text_context_is_a_400(model):
    assert model.count_text_tokens("a cat") < 16
    with pytest.raises(APIError) as info:
        model.count_text_tokens("cat " * 40)
    error = info.value
    assert error.status == 400 and error.param == "prompt"
    assert (
        "16" in error.message and str(model.engine.count_text_tokens("cat " * 40)) in error.message
    )


def test_a_failing_call_fails_only_its_own_requests(model):
    model.reconfigure({"max_batch_images": 8, "batch_wait_timeout_s": 0.5})
    jobs = [job("ok-1"), job("broken", width=BROKEN_WIDTH), job("ok-2", seeds=(2, 3))]

    async def scenario():
        return await asyncio.gather(*(model.generate(j) for j in jobs), return_exceptions=True)

    ok_1, broken, ok_2 = asyncio.run(scenario())
    assert isinstance(broken, RuntimeError) and "out of memory" in str(broken)
    assert len(ok_1.images) == 1 and len(ok_2.images) == 2
    assert ok_1.batch_sizes == ok_2.batch_sizes == [3]  # ok-1 and ok-2 shared one call


def test_a_request_bigger_than_a_call_is_split_keeping_its_seeds(model):
    model.reconfigure({"max_batch_images": 2, "batch_wait_timeout_s": 0})
    try:
        split = asyncio.run(model.generate(job("big", seeds=(4, 5, 6))))
        alone = asyncio.run(model.generate(job("alone", seeds=(6,))))
    finally:
        model.reconfigure({})
    assert split.batch_sizes == [2, 1]
    assert split.images[2] == alone.images[0]  # seed 6 ran alone in both: identical bytes


def test_health_fails_when_a_call_hangs_or_the_model_is_gone(model):
    model.check_health()
    model._call_started = time.monotonic() - model.config.max_pipeline_call_s - 1
    try:
        with pytest.raises(RuntimeError, match="treating the replica as hung"):
            model.check_health()
    finally:
        model._call_started = None
    pipe, model.engine.pipe = model.engine.pipe, None
    try:
        with pytest.raises(RuntimeError, match="not loaded"):
            model.check_health()
    finally:
        model.engine.pipe = pipe
    model.check_health()


def test_the_replica_reports_the_work_it_holds(model):
    """`record_autoscaling_stats` (what WorkPolicy scales on): queued work while a call runs,
    running work that shrinks with the steps done, nothing once idle; a measured wait."""
    from serve_app.autoscaling import request_work

    model.reconfigure({"max_batch_images": 1, "batch_wait_timeout_s": 0})
    seen = []
    original = model._on_step

    def on_step(step, total, jobs, latents):
        original(step, total, jobs, latents)
        seen.append(model.autoscaling_stats())

    model._on_step = on_step
    metrics = (model.metrics.queued_work, model.metrics.estimated_wait)
    model.metrics.queued_work, model.metrics.estimated_wait = Recorder(), Recorder()
    first, second = job("first"), make_job(request_id="second", width=128, steps=4, seeds=(1,))

    async def scenario():
        return await asyncio.gather(model.generate(first), model.generate(job("third")))

    try:
        asyncio.run(model.generate(job("warm")))
        seen.clear()
        model.metrics.queued_work.calls.clear()
        model.metrics.estimated_wait.calls.clear()
        asyncio.run(scenario())
        queued_gauge, wait_gauge = model.metrics.queued_work, model.metrics.estimated_wait
    finally:
        model._on_step = original
        model.metrics.queued_work, model.metrics.estimated_wait = metrics
        model.reconfigure({})
    text = model.config.max_sequence_length
    # The same numbers as metrics: queue depth in work units, and a wait from the measured rate.
    assert queued_gauge.calls[0][0] == seen[0]["queued_work"] > 0
    assert wait_gauge.calls[0][0] > 0
    # During the first call (2 steps): the second job queued, the first running.
    assert seen[0] == {
        "queued_work": request_work(job("third"), text),
        "running_work": request_work(first, text, 1),
    }
    assert seen[1]["running_work"] == 0  # last step done
    idle = asyncio.run(model.record_autoscaling_stats())  # what Ray Serve calls
    assert idle == {"queued_work": 0, "running_work": 0}
    assert model._work_per_s > 0
    assert request_work(second, text) > request_work(first, text)  # bigger and longer: more work
