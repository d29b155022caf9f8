"""Streaming (SSE through the stock SDK) and cancellation on the running app."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.conftest import assert_batch_equivalent, pixels


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_sdk_streams_partials_then_completed_images(client):
    stream = client.images.generate(
        prompt="a lighthouse",
        size="128x96",
        n=2,
        stream=True,
        partial_images=2,
        extra_body={"seed": 11, "num_inference_steps": 6},
    )
    events = list(stream)
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(partials) == 4 and len(completed) == 2
    assert events.index(completed[0]) > max(events.index(p) for p in partials)
    assert sorted((p.model_extra["image_index"], p.partial_image_index) for p in partials) == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert [c.model_extra["image_index"] for c in completed] == [0, 1]
    assert [c.model_extra["seed"] for c in completed] == [11, 12]
    for event in events:
        assert image_of(event.b64_json).size == (128, 96)
        assert (event.size, event.output_format, event.quality) == ("128x96", "png", "medium")
    assert completed[0].usage.output_tokens == 2 * (128 // 16) * (96 // 16)
    # The completed images are exactly what the same request returns without streaming.
    plain = client.images.generate(
        prompt="a lighthouse",
        size="128x96",
        n=2,
        extra_body={"seed": 11, "num_inference_steps": 6},
    )
    assert [c.b64_json for c in completed] == [d.b64_json for d in plain.data]
    # Partials are intermediate states, not copies of the result.
    first_partial = next(p for p in partials if p.model_extra["image_index"] == 0)
    assert first_partial.b64_json != completed[0].b64_json


def test_sdk_streams_edits(client):
    png = io.BytesIO()
    Image.new("RGB", (80, 80), "orange").save(png, format="PNG")
    events = list(
        client.images.edit(
            image=("a.png", png.getvalue(), "image/png"),
            prompt="make it blue",
            size="64x64",
            stream=True,
            partial_images=1,
            output_format="jpeg",
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert all(image_of(e.b64_json).format == "JPEG" for e in events)
    assert events[1].usage.input_tokens_details.image_tokens > 0


def test_partial_images_zero_streams_only_completed(client):
    events = list(client.images.generate(prompt="x", size="64x64", stream=True, partial_images=0))
    assert [e.type for e in events] == ["image_generation.completed"]


def test_raw_sse_format(http):
    body = {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 1}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    assert [b.splitlines()[0] for b in blocks] == [
        "event: image_generation.partial_image",
        "event: image_generation.completed",
    ]
    assert all(b.splitlines()[1].startswith("data: {") for b in blocks)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "cat " * 600, "stream": True}, "prompt"),
        ({"prompt": "x", "stream": True, "response_format": "url"}, "response_format"),
        ({"prompt": "x", "partial_images": 2}, "partial_images"),
        ({"prompt": "x", "stream": True, "partial_images": 4}, "partial_images"),
    ],
)
def test_stream_validation_errors_are_plain_json(http, body, param):
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_variations_cannot_stream(http):
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    files = {"image": ("a.png", png.getvalue(), "image/png")}
    response = http.post("/v1/images/variations", files=files, data={"stream": "true"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"


def timed_post(base_url, body, timeout):
    started = time.monotonic()
    try:
        response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=timeout)
        return response, time.monotonic() - started
    except httpx.TimeoutException:
        return None, time.monotonic() - started


def test_dropped_request_frees_the_replica_within_a_step(base_url):
    small = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
    _, per_4_steps = timed_post(
        base_url, {**small, "size": "1024x1024", "num_inference_steps": 4}, 60
    )
    long_body = {"prompt": "long", "size": "1024x1024", "num_inference_steps": 100}
    expected_long_s = per_4_steps * 25
    dropped, _ = timed_post(base_url, long_body, timeout=1.5)
    assert dropped is None, "the long request should still be running when the client leaves"
    response, elapsed = timed_post(base_url, small, 60)
    assert response.status_code == 200
    # The dropped request had ~expected_long_s - 1.5 s of work left; the replica was free at once.
    assert elapsed < max(2.0, 0.25 * expected_long_s), (elapsed, expected_long_s)


def test_batch_mate_of_a_cancelled_request_gets_its_image(base_url):
    body = {"prompt": "a lighthouse", "size": "256x256", "num_inference_steps": 40}
    alone, _ = timed_post(base_url, {**body, "seed": 2}, 60)
    with ThreadPoolExecutor(2) as pool:
        dropped = pool.submit(timed_post, base_url, {**body, "seed": 1}, 0.6)
        time.sleep(0.05)
        kept = pool.submit(timed_post, base_url, {**body, "seed": 2}, 60)
        assert dropped.result()[0] is None
        response, _ = kept.result()
    assert response.status_code == 200
    assert response.headers["x-batch-images"] == "2"  # they really shared the pipeline call
    assert_batch_equivalent(
        pixels(response.json()["data"][0]["b64_json"]), pixels(alone.json()["data"][0]["b64_json"])
    )


MODEL_LABEL = 'model="flux-kontext-tiny"'


def metric_values(port: int, name: str, label: str = "") -> list[float]:
    """Values of a metric's series (those whose labels contain `label`) from Ray's exporter."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    ]


def wait_for_metric(port: int, name: str, predicate, label: str = "", timeout_s=30) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        values = metric_values(port, name, label)
        if predicate(values) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def settled_sum(port: int, name: str, label: str = "") -> float:
    """The metric's total once earlier work has been reported (two equal reads in a row)."""
    previous = None
    for _ in range(30):
        current = sum(metric_values(port, name, label))
        if current == previous:
            return current
        previous = current
        time.sleep(1.5)
    raise AssertionError(f"{name} did not settle")


def test_progress_is_exported_as_metrics(http, metrics_port):
    """Denoising steps are counted per image and the running call's progress is a gauge."""
    steps = "ray_serve_app_denoising_steps_total"
    before = settled_sum(metrics_port, steps, MODEL_LABEL)
    body = {"prompt": "x", "size": "64x64", "n": 2, "num_inference_steps": 3}
    assert http.post("/v1/images/generations", json=body).status_code == 200
    after = sum(wait_for_metric(metrics_port, steps, lambda v: sum(v) >= before + 6, MODEL_LABEL))
    assert after == before + 6  # 3 steps x 2 images
    progress = wait_for_metric(metrics_port, "ray_serve_app_pipeline_progress", bool, MODEL_LABEL)
    assert progress and max(progress) == 1.0
