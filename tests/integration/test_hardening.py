"""Limits, backpressure, metrics and a short soak against the running app."""

import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import httpx

from serve_app.bench.load import run_load
from tests.integration.conftest import APP_NAME
from tests.integration.test_streaming import metric_values, settled_sum


def test_json_body_limits(http):
    big = b'{"prompt": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    response = http.post(
        "/v1/images/generations", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the size is enforced while reading
        yield b'{"prompt": "'
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}'

    response = http.post(
        "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_request_pixel_and_prompt_limits(http):
    too_many = http.post(
        "/v1/images/generations", json={"prompt": "x", "n": 3, "size": "1024x1024"}
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    long_prompt = http.post("/v1/images/generations", json={"prompt": "y" * 20_001})
    assert long_prompt.status_code == 400
    assert "characters" in long_prompt.json()["error"]["message"]


def test_request_id_appears_in_error_messages(http):
    response = http.post(
        "/v1/images/generations", json={"prompt": ""}, headers={"x-request-id": "trace-42"}
    )
    assert "trace-42" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "trace-42"


def test_overload_is_a_fast_429_with_retry_after(base_url, metrics_port):
    """16 requests fit on the replica, 4 more may queue (test config); the rest are refused."""
    rejected = "ray_serve_app_rejected_requests_total"
    backpressure = 'reason="backpressure"'
    rejected_before = settled_sum(metrics_port, rejected, backpressure)
    body = {"prompt": "x", "size": "512x512", "num_inference_steps": 12}  # seconds per batch

    def post(_):
        started = time.monotonic()
        response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=120)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(post, range(40)))
    statuses = [response.status_code for response, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 5 and statuses.count(200) >= 16
    for response, seconds in results:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "server_overloaded"
            assert seconds < 5  # refused at once, not after queueing
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        values = metric_values(metrics_port, rejected, backpressure)
        if sum(values) >= rejected_before + statuses.count(429):
            break
        time.sleep(1)
    assert sum(values) >= rejected_before + statuses.count(429)


def test_request_metrics_are_scrapeable(http, metrics_port):
    name = "ray_serve_app_requests_total"
    before = settled_sum(metrics_port, name)
    assert (
        http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}).status_code
        == 200
    )
    assert http.post("/v1/images/generations", json={"prompt": ""}).status_code == 400
    deadline = time.monotonic() + 30
    while sum(metric_values(metrics_port, name)) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'endpoint="/v1/images/generations"' in text and 'status="400"' in text
    for family in (
        "ray_serve_app_images_total",
        "ray_serve_app_input_tokens_total",
        "ray_serve_app_output_tokens_total",
        "ray_serve_app_request_seconds_bucket",
        "ray_serve_app_queue_wait_seconds_bucket",
        "ray_serve_app_pipeline_seconds_per_image_bucket",
        "ray_serve_app_images_per_call_bucket",
    ):
        assert family in text, family


def test_short_soak_has_no_errors_and_flat_memory(base_url, tmp_path):
    args = Namespace(
        url=base_url,
        requests=10_000,
        duration=45,
        concurrency=4,
        warmup=40,
        size="64x64",
        steps=2,
        n=1,
        model=None,
        api_key=None,
        timeout=60,
        out=str(tmp_path / "soak.json"),
    )
    import asyncio

    result = asyncio.run(run_load(args))
    unexpected = {
        k: v for k, v in result["outcomes"].items() if k != "ok" and k[:3] not in ("429", "503")
    }
    assert not unexpected, result["outcomes"]
    assert result["successes"] > 100
    assert result["latency_s"]["p99"] is not None
    # Measured: the proxy, the ingress and every running model replica (from Ray's actor table).
    from ray import serve

    deployments = serve.status().applications[APP_NAME].deployments
    model_replicas = sum(
        info.replica_states.get("RUNNING", 0)
        for name, info in deployments.items()
        if name.startswith("ImageModel-")
    )
    measured = result["server_rss_mib"]["measured"]
    assert "ProxyActor" in measured and f"ServeReplica:{APP_NAME}:ImagesIngress" in measured
    replicas = [m for m in measured if m.startswith(f"ServeReplica:{APP_NAME}:ImageModel-")]
    assert model_replicas >= 1 and len(replicas) == model_replicas, (measured, model_replicas)
    assert result["server_rss_mib"]["growth_percent"] < 5, result["server_rss_mib"]
