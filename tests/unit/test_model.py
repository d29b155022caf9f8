"""The model deployment class without Ray: token limits and per-group failure isolation."""

import asyncio

import pytest

from serve_app.batching import ImageJob
from serve_app.engine import FluxEngine
from serve_app.model import ImageModel
from serve_app.protocol import APIError

BROKEN_WIDTH = 128


class EngineBrokenForOneSize(FluxEngine):
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
    return ImageJob(
        request_id=name, prompt="a cat", width=width, height=64, steps=2, guidance=2.5, seeds=seeds
    )


def test_prompt_over_the_text_context_is_a_400(model):
    assert model.count_text_tokens("a cat") < 16
    with pytest.raises(APIError) as info:
        model.count_text_tokens("cat " * 40)
    error = info.value
    assert error.status == 400 and error.param == "prompt"
    assert (
        "16" in error.message and str(model.engine.count_text_tokens("cat " * 40)) in error.message
    )


async def run(model, jobs):
    return await asyncio.gather(*model.run_jobs(jobs))


def test_a_failing_call_fails_only_its_own_requests(model):
    jobs = [job("ok-1"), job("broken", width=BROKEN_WIDTH), job("ok-2", seeds=(2, 3))]
    results = asyncio.run(run(model, jobs))
    assert len(results) == 3
    assert isinstance(results[1], RuntimeError)
    (images_1, call_1), (images_2, call_2) = results[0], results[2]
    assert [im.size for im in images_1] == [(64, 64)]
    assert [im.size for im in images_2] == [(64, 64), (64, 64)]
    assert call_1 == call_2 == 3  # ok-1 and ok-2 shared one call of 3 images


def test_jobs_waiting_while_a_call_runs_ride_the_next_call_together(model):
    """Batches handed over while the pipeline is busy merge into one full call."""

    async def scenario():
        first = model.run_jobs([job("first")])
        await asyncio.sleep(0)  # the first call is now running in the pipeline thread
        later = [model.run_jobs([job(f"later-{i}", seeds=(i,))]) for i in range(3)]
        return await asyncio.gather(*first, *(f for batch in later for f in batch))

    results = asyncio.run(scenario())
    assert [images_in_call for _, images_in_call in results] == [1, 3, 3, 3]


def test_health_check_passes_when_loaded(model):
    model.check_health()
