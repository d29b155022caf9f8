"""Previews are the pipeline's own intermediate states; cancellation stops work at a step."""

import asyncio
import threading

import numpy as np
import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.contract import Accepted, Completed, GenerationCancelled, PartialImage
from serve_app.engine import ImageEngine
from serve_app.model import ImageModel
from tests.conftest import assert_batch_equivalent, make_job

STEPS = 6


def engine_for(tiny_cache_dir, decoder):
    torch.set_num_threads(2)
    engine = ImageEngine(
        ModelConfig(id="t", source="tiny", cache_dir=tiny_cache_dir, preview_decoder=decoder)
    )
    engine.load()
    return engine


@pytest.fixture(scope="module", params=["vae", "latent_rgb"])
def engine(request, tiny_cache_dir):
    return engine_for(tiny_cache_dir, request.param)


def job(**fields):
    return make_job(**{"width": 96, "height": 64, "steps": STEPS, **fields})


def as_array(image):
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_previews_arrive_per_job_with_indices_and_sizes(engine):
    events_a, events_b = [], []
    a = job(seeds=(1, 2), preview_steps=(1, 3), events=events_a.append)
    b = job(seeds=(3,), preview_steps=(2,), events=events_b.append, first_image_index=4)
    engine.generate([a, b])
    assert [(e.partial_index, e.step, len(e.images)) for e in events_a] == [(0, 1, 2), (1, 3, 2)]
    assert [(e.partial_index, e.step, e.first_image_index) for e in events_b] == [(0, 2, 4)]
    assert all(im.size == (96, 64) for e in events_a + events_b for im in e.images)


def test_a_preview_at_the_last_step_is_the_final_image(tiny_cache_dir):
    """The preview is the current estimate of the final image: at the last step it *is* it."""
    engine = engine_for(tiny_cache_dir, "vae")
    events = []
    [[final]] = engine.generate([job(preview_steps=(0, 2, STEPS - 1), events=events.append)])
    distances = [np.abs(as_array(e.images[0]) - as_array(final)).mean() for e in events]
    assert distances[-1] == 0
    assert distances[0] > distances[1] > 0, distances  # earlier estimates are further away


def test_cheap_previews_project_the_same_latents(tiny_cache_dir):
    engine = engine_for(tiny_cache_dir, "latent_rgb")
    assert engine._preview_projection.shape == (17, 3)
    events = []
    engine.generate([job(preview_steps=(STEPS - 1,), events=events.append)])
    final_latents = engine.pipe(
        prompt="a cat",
        width=96,
        height=64,
        max_area=96 * 64,
        num_inference_steps=STEPS,
        guidance_scale=2.5,
        generator=[torch.Generator().manual_seed(1)],
        output_type="latent",
    ).images
    [expected] = engine.decode_preview(final_latents, 96, 64)
    assert np.array_equal(as_array(events[0].images[0]), as_array(expected))


def test_call_stops_at_the_next_step_when_every_request_is_cancelled(tiny_cache_dir):
    engine = engine_for(tiny_cache_dir, "latent_rgb")
    cancel, steps_run = threading.Event(), []

    def on_step(step, total, jobs, latents):
        steps_run.append(step)
        if step == 1:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate([job(steps=50, cancel=cancel)], on_step)
    assert steps_run == [0, 1]


def test_a_live_batch_mate_keeps_the_call_and_gets_its_image(tiny_cache_dir):
    engine = engine_for(tiny_cache_dir, "latent_rgb")
    cancel = threading.Event()
    cancel.set()
    results = engine.generate([job(seeds=(5,), cancel=cancel), job(seeds=(6,))])
    [[alone]] = engine.generate([job(seeds=(6,))])
    assert_batch_equivalent(as_array(results[1][0]), as_array(alone))


def test_a_call_whose_jobs_are_all_cancelled_never_runs(tiny_cache_dir):
    model = ImageModel({"id": "t", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup": False})
    calls = []
    original = model.engine.generate
    model.engine.generate = lambda jobs, cb=None: calls.append(jobs) or original(jobs, cb)
    cancel = threading.Event()
    cancel.set()
    outcomes = asyncio.run(model._run_call([job(cancel=cancel), job(cancel=cancel, seeds=(2,))]))
    assert calls == [] and all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    [(images, in_call)] = asyncio.run(model._run_call([job(width=128, seeds=(2,))]))
    assert [im.size for im in images] == [(128, 64)] and in_call == 1
    assert [[j.width for j in group] for group in calls] == [[128]]


def test_model_stream_events_are_typed_and_in_order(tiny_cache_dir):
    model = ImageModel({"id": "t", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup": False})

    async def collect():
        return [e async for e in model.generate_stream(job(seeds=(1, 2), preview_steps=(1, 3)))]

    events = asyncio.run(collect())
    assert isinstance(events[0], Accepted) and events[0].text_tokens > 0
    partials = events[1:-1]
    assert all(isinstance(e, PartialImage) for e in partials)
    assert sorted((e.image_index, e.partial_image_index) for e in partials) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert isinstance(events[-1], Completed) and len(events[-1].result.images) == 2
