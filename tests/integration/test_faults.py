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


def replica_names() -> set[str]:
    import ray

    return {
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if DEPLOYMENT in actor["name"] and "REPLICA" in actor["name"]
    }


def test_replica_failing_its_health_check_is_replaced(http, base_url, serve_config, redeploy):
    """A pipeline call that runs past max_pipeline_call_s (a hung GPU) fails the health check;
    Ray Serve replaces the replica, the stuck request gets an error, and service resumes."""
    import copy

    hung = copy.deepcopy(serve_config)
    [app] = hung["applications"]
    app["args"]["models"][0]["max_pipeline_call_s"] = 2
    model = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT)
    model.update(health_check_period_s=1, health_check_timeout_s=10, graceful_shutdown_timeout_s=1)
    redeploy(hung)
    try:
        wait_healthy(http)
        before = replica_names()
        started = time.monotonic()
        response = httpx.post(
            f"{base_url}/v1/images/generations",
            json={"prompt": "x", "size": "1408x1408", "num_inference_steps": 100},
            timeout=120,
        )
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_unavailable"
        assert elapsed < 25  # the call alone would take about 50 s here
        wait_healthy(http)
        after = replica_names()
        assert after and not (after & before), (before, after)
    finally:
        redeploy(serve_config)
    wait_healthy(http)
    assert (
        http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}).status_code
        == 200
    )
