"""Speed switches combined, through the real app: `speed.compile` with the first-block cache.

That combination crashed at the first call (`Unsupported: Skip inlining torch.compiler.disable()d
function` from the cache's hook under `fullgraph=True`) and no test combined the switches. A
second app serves the tiny model with both on; its images must equal an uncompiled engine with
the same cache within batched-rounding tolerance, for text-to-image, edits and a stream.
"""

import copy
import time

import numpy as np
import pytest

from tests.conftest import decode_base64_image
from tests.integration.test_edits import noise_png

pytestmark = pytest.mark.integration

CACHE = 0.3  # loose enough that the tiny model's cache skips steps at 8 steps
SPEED = {"compile": True, "first_block_cache_threshold": CACHE}
STEPS = 8
TOLERANCE = 2  # per channel: what batched vs alone rounding differs by


@pytest.fixture(scope="module")
def fast_app(serve_config, redeploy):
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    fast = copy.deepcopy(app)
    fast["name"], fast["route_prefix"] = "fast", "/fast"
    fast["args"]["jobs"] = {"enabled": False}
    model = fast["args"]["models"][0]
    model.pop("lora", None)
    model["speed"] = SPEED
    model["warmup_sizes"] = ["64x64"]  # compiled (text-to-image and edit) before it is healthy
    for deployment in fast["deployments"]:
        deployment.setdefault("ray_actor_options", {})["num_cpus"] = 0  # beside the session app
    config["applications"].append(fast)
    redeploy(config)
    from ray import serve

    deadline = time.monotonic() + 300
    while (status := serve.status().applications.get("fast")) is None or (
        status.status != "RUNNING"
    ):
        assert status is None or status.status != "DEPLOY_FAILED", status.message
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    port = config["http_options"]["port"]
    try:
        yield f"http://127.0.0.1:{port}/fast"
    finally:
        redeploy(serve_config)


@pytest.fixture(scope="module")
def cached_engine(tiny_cache_dir):
    """The same model with the cache only: what the compiled one must reproduce."""
    from serve_app.config import ModelConfig
    from serve_app.engine import ImageEngine

    engine = ImageEngine(
        ModelConfig(
            id="flux-kontext-tiny",
            source="tiny",
            cache_dir=tiny_cache_dir,
            speed={"first_block_cache_threshold": CACHE},
        )
    )
    engine.load()
    return engine


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def expected(engine, prompt: str, seed: int, size: int, canvas=None) -> np.ndarray:
    from serve_app.contract import ModelRequest

    request = ModelRequest(
        request_id="expected",
        prompt=prompt,
        width=size,
        height=size,
        steps=STEPS,
        guidance=engine.config.default_guidance,
        seeds=(seed,),
        conditioning=(canvas,) if canvas is not None else (),
    )
    [[image]] = engine.generate([request])
    return pixels(image)


def test_compile_with_first_block_cache_serves_what_eager_with_the_cache_makes(
    fast_app, cached_engine, client
):
    from openai import OpenAI

    fast = OpenAI(base_url=f"{fast_app}/v1", api_key="unused", max_retries=0, timeout=300)
    extra = {"seed": 7, "num_inference_steps": STEPS}
    answer = fast.images.generate(prompt="a lighthouse", size="64x64", extra_body=extra)
    served = pixels(decode_base64_image(answer.data[0].b64_json))
    want = expected(cached_engine, "a lighthouse", 7, 64)
    assert np.abs(served - want).max() <= TOLERANCE
    # The cache is really on in the served model: the plain session app makes another image.
    plain = client.images.generate(prompt="a lighthouse", size="64x64", extra_body=extra)
    assert not np.array_equal(served, pixels(decode_base64_image(plain.data[0].b64_json)))


def test_compiled_cached_model_edits_and_streams(fast_app, cached_engine):
    import io

    from openai import OpenAI
    from PIL import Image

    from serve_app.imageops import prepare_conditioning

    fast = OpenAI(base_url=f"{fast_app}/v1", api_key="unused", max_retries=0, timeout=300)
    extra = {"seed": 3, "num_inference_steps": STEPS}
    source = noise_png(64, 64, seed=2)
    answer = fast.images.edit(
        image=("in.png", source, "image/png"), prompt="make it night", size="64x64",
        extra_body=extra,
    )  # fmt: skip
    served = pixels(decode_base64_image(answer.data[0].b64_json))
    buckets = cached_engine.config.resolution_buckets
    canvas = prepare_conditioning([Image.open(io.BytesIO(source))], None, (64, 64), buckets).canvas
    want = expected(cached_engine, "make it night", 3, 64, canvas)
    assert np.abs(served - want).max() <= TOLERANCE
    events = list(
        fast.images.generate(
            prompt="a fox", size="64x64", stream=True, partial_images=2, extra_body=extra
        )
    )
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
