"""Faults: a model replica dies mid-request; clients get errors (never a hang), service recovers."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_app.config import ModelConfig

DEPLOYMENT = ModelConfig(id="flux-kontext-tiny", source="tiny").deployment_name


def kill_model_replicas() -> int:
    import ray

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if DEPLOYMENT in actor["name"] and "REPLICA" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            killed += 1
    return killed


def wait_healthy(http, timeout_s=120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if http.get("/health").status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the app did not become healthy again")


def test_killed_replica_errors_in_flight_requests_and_is_replaced(client, http, base_url):
    long_body = {"prompt": "x", "size": "1024x1024", "num_inference_steps": 60}
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(
            httpx.post, f"{base_url}/v1/images/generations", json=long_body, timeout=120
        )
        stream = client.images.generate(
            prompt="y",
            size="1024x1024",
            stream=True,
            partial_images=3,
            extra_body={"num_inference_steps": 60},
        )
        events = iter(stream)
        first = next(events)
        assert first.type == "image_generation.partial_image"
        assert kill_model_replicas() >= 1
        with pytest.raises(openai.APIError) as info:
            for _ in events:
                pass
        assert info.value.body["code"] == "model_unavailable"
        response = plain.result(timeout=60)  # an answer, not a hang
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert response.headers["retry-after"] == "1"
    wait_healthy(http)
    result = client.images.generate(prompt="after", size="64x64")
    assert len(result.data) == 1
