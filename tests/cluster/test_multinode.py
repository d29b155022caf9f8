"""The app on a three-node Ray cluster: placement, node loss under load, rolling updates."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
from openai import OpenAI
from ray.serve.schema import ServeDeploySchema

from tests.cluster.conftest import (
    INGRESS,
    MODEL,
    deployment_config,
    replicas,
    running_nodes,
    wait_for,
)
from tests.conftest import pixels

pytestmark = pytest.mark.integration
PROMPT = "a lighthouse at dawn"


def sdk(serve_cluster, retries: int = 0) -> OpenAI:
    return OpenAI(
        base_url=f"{serve_cluster.url}/v1", api_key="unused", max_retries=retries, timeout=60
    )


class Load:
    """Requests from a few threads until stopped, plain (SDK) and streaming (raw SSE) in turn;
    every request sent is recorded with how it ended, so none can go unanswered unnoticed."""

    def __init__(self, serve_cluster, threads: int = 3, request=None) -> None:
        """`request(client)`: what each thread sends (default: plain and streaming in turn)."""
        self.serve_cluster = serve_cluster
        self.request = request
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.outcomes: list[tuple[float, str]] = []  # (end time, outcome)
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in self.threads), "a request hung"

    def run(self, index: int) -> None:
        client = sdk(self.serve_cluster)
        stream = self.request is None and index % 2 == 1
        while not self.stop.is_set():
            with self.lock:
                self.sent += 1
            outcome = self.streamed() if stream else self.plain(client)
            with self.lock:
                self.outcomes.append((time.monotonic(), outcome))

    def plain(self, client: OpenAI) -> str:
        try:
            if self.request is not None:
                self.request(client)
                return "ok"
            result = client.images.generate(model="flux-kontext-tiny", prompt=PROMPT, size="64x64")
            return "ok" if result.data[0].b64_json else "empty"
        except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
            return f"http {getattr(exc, 'status_code', type(exc).__name__)}"

    def streamed(self) -> str:
        body = {"prompt": PROMPT, "size": "64x64", "stream": True, "partial_images": 1}
        try:
            with httpx.stream(
                "POST", f"{self.serve_cluster.url}/v1/images/generations", json=body, timeout=60
            ) as response:
                if response.status_code != 200:
                    return f"http {response.status_code}"
                events = [line for line in response.iter_lines() if line.startswith("event:")]
        except httpx.HTTPError as exc:
            return f"transport {type(exc).__name__}"
        if events and events[-1] == "event: image_generation.completed":
            return "ok"
        if events and events[-1] == "event: error":
            return "stream error"
        return f"stream ended after {events[-1:]}"

    def counts(self, since: float = 0.0) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ended, outcome in self.outcomes:
            if ended >= since:
                counts[outcome] = counts.get(outcome, 0) + 1
        return counts


def test_replicas_spread_over_the_worker_nodes_and_the_ingress_stays_on_the_head(serve_cluster):
    nodes = serve_cluster.wait_replicas(2)
    assert set(nodes) == {worker.node_id for worker in serve_cluster.workers}
    assert serve_cluster.head_id not in nodes
    assert running_nodes(INGRESS) == [serve_cluster.head_id]
    result = sdk(serve_cluster).images.generate(prompt=PROMPT, size="64x64", n=2)
    assert len(result.data) == 2


def test_a_node_lost_under_load_answers_every_request(serve_cluster):
    serve_cluster.wait_replicas(2)
    victim = serve_cluster.workers[0]
    with Load(serve_cluster) as load:
        time.sleep(4)
        lost_at = time.monotonic()
        serve_cluster.remove_worker(victim)  # no graceful stop: the node is gone
        # Meanwhile the surviving node keeps answering.
        wait_for(lambda: load.counts(since=time.monotonic() - 1).get("ok", 0) >= 3, 60,
                 "successes on the surviving node")  # fmt: skip
        with_retries = sdk(serve_cluster, retries=4)
        for _ in range(4):  # the SDK's retries turn a 503 into a success
            assert with_retries.images.generate(prompt=PROMPT, size="64x64").data[0].b64_json
        time.sleep(2)
    assert load.sent == len(load.outcomes), "a request went unanswered"
    allowed = {"ok", "http 503", "stream error"}
    assert set(load.counts()) <= allowed, load.counts()
    assert load.counts(since=lost_at).get("ok", 0) >= 3
    print("node loss under load:", load.sent, "sent,", load.counts())
    # Serve notices the dead node (Ray's health checks) and drops its replica.
    wait_for(lambda: victim.node_id not in running_nodes(MODEL), 120, "the lost replica gone")

    # A node joins again: Serve brings the deployment back to its target on it.
    replacement = serve_cluster.add_worker()
    nodes = serve_cluster.wait_replicas(2, timeout_s=240)
    assert replacement.node_id in nodes


def test_rolling_updates_fail_no_request(serve_cluster):
    serve_cluster.wait_replicas(2)
    client = sdk(serve_cluster)
    before = (
        client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 7}).data[0].b64_json
    )
    ids = {r["replica_id"] for r in replicas(MODEL) if r["state"] == "RUNNING"}

    # 1. Batching knobs (user_config) apply live: the same replicas, reconfigured.
    live = copy.deepcopy(serve_cluster.config)
    model = next(d for d in live["applications"][0]["deployments"] if d["name"] == MODEL)
    model["user_config"] = {"max_batch_images": 4, "batch_wait_timeout_s": 0.02}
    with Load(serve_cluster, threads=2) as load:
        time.sleep(2)
        serve_cluster.deploy(live)
        time.sleep(3)
    assert load.counts() and set(load.counts()) == {"ok"}, load.counts()
    assert {r["replica_id"] for r in replicas(MODEL) if r["state"] == "RUNNING"} == ids

    # 2. A model setting replaces the replicas, one at a time, under steady load.
    changed = copy.deepcopy(live)
    changed["applications"][0]["args"]["models"][0]["default_guidance"] = 7.0
    running_counts = []

    def replaced() -> bool:
        states = replicas(MODEL)
        if states:  # empty while the controller rebuilds the app from the new config
            running_counts.append(sum(r["state"] == "RUNNING" for r in states))
        running = {r["replica_id"] for r in states if r["state"] == "RUNNING"}
        return len(running) == 2 and not ids & running

    with Load(serve_cluster, threads=2) as load:
        time.sleep(2)
        serve_cluster.client.deploy_apps(ServeDeploySchema.model_validate(changed))
        wait_for(replaced, 240, "every replica replaced")
        time.sleep(2)
    assert load.counts() and set(load.counts()) == {"ok"}, load.counts()
    print("running model replicas during the update:", running_counts)
    assert running_counts and min(running_counts) >= 1  # one at a time: one kept serving
    after = (
        client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 7}).data[0].b64_json
    )
    assert (pixels(before) != pixels(after)).any()  # the new setting is what runs now


def _heavy(client: OpenAI) -> None:
    """8 steps of four 512x512 images: ~11 work units (a 64x64 image at 2 steps is ~0.2)."""
    client.images.generate(prompt=PROMPT, size="512x512", n=4, quality="high")


def _light(client: OpenAI) -> None:
    client.images.generate(prompt=PROMPT, size="64x64", quality="low")


def test_autoscaling_follows_denoising_work_not_request_counts(serve_cluster):
    """Two clients of heavy requests: Serve's default policy (ongoing requests) stays at one
    replica; WorkPolicy scales out; light traffic alone scales back in."""
    config = copy.deepcopy(serve_cluster.config)
    model = deployment_config(config, MODEL)
    del model["num_replicas"]
    fast = {
        "min_replicas": 1,
        "max_replicas": 2,
        "upscale_delay_s": 0,
        "downscale_delay_s": 3,
        "look_back_period_s": 2,
        "metrics_interval_s": 0.5,
    }
    try:
        model["autoscaling_config"] = {**fast, "target_ongoing_requests": 2}
        serve_cluster.deploy(config)
        serve_cluster.wait_replicas(1)
        counts = []
        with Load(serve_cluster, threads=2, request=_heavy) as heavy:
            for _ in range(30):  # 15 s of sustained heavy load
                counts.append(len(running_nodes(MODEL)))
                time.sleep(0.5)
        assert set(heavy.counts()) == {"ok"}, heavy.counts()
        assert max(counts) == 1  # 2 ongoing requests meet the default policy's target

        model["autoscaling_config"] = {
            **fast,
            "policy": {
                "policy_function": "serve_app.autoscaling:WorkPolicy",
                "policy_kwargs": {"target_work_per_replica": 8},
            },
        }
        serve_cluster.deploy(config)
        serve_cluster.wait_replicas(1)
        with Load(serve_cluster, threads=2, request=_heavy) as heavy:
            serve_cluster.wait_replicas(2, timeout_s=90)  # ~11 units in flight per request
        assert set(heavy.counts()) == {"ok"}, heavy.counts()
        with Load(serve_cluster, threads=2, request=_light) as light:
            serve_cluster.wait_replicas(1, timeout_s=90)  # ~0.5 units: one replica is enough
        assert set(light.counts()) == {"ok"}, light.counts()
    finally:
        serve_cluster.deploy()


def test_url_images_written_on_one_node_are_read_through_another(serve_cluster):
    """Signed url images written by the ingress on the head are served by an ingress on a worker
    node (a shared directory, as a shared mount), and S3 links (a moto server) stay valid."""
    from moto.server import ThreadedMotoServer

    def moved_ingress(config: dict, resource: str) -> dict:
        moved = copy.deepcopy(config)
        ingress = deployment_config(moved, INGRESS)
        ingress["ray_actor_options"] = {"num_cpus": 0, "resources": {resource: 0.01}}
        return moved

    def url_images(n: int = 2) -> list[tuple[str, bytes]]:
        result = sdk(serve_cluster).images.generate(
            prompt=PROMPT, size="64x64", n=n, response_format="url"
        )
        return [(item.url, httpx.get(item.url, timeout=30).content) for item in result.data]

    def on_worker(config: dict) -> None:
        serve_cluster.deploy(moved_ingress(config, "worker_node"))
        worker_ids = {worker.node_id for worker in serve_cluster.workers}
        wait_for(lambda: set(running_nodes(INGRESS)) <= worker_ids and running_nodes(INGRESS),
                 120, "the ingress on a worker node")  # fmt: skip

    try:
        serve_cluster.deploy()
        assert running_nodes(INGRESS) == [serve_cluster.head_id]
        written = url_images()
        assert all(content[:8] == b"\x89PNG\r\n\x1a\n" for _, content in written)
        assert len(list(serve_cluster.images_dir.iterdir())) >= 2
        on_worker(serve_cluster.config)
        for url, content in written:
            response = httpx.get(url, timeout=30)
            assert response.status_code == 200 and response.content == content

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        try:
            aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                   "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
            import boto3

            boto3.client("s3", endpoint_url=endpoint, **_aws_kwargs(aws)).create_bucket(
                Bucket="cluster-images"
            )
            s3 = copy.deepcopy(serve_cluster.config)
            app = s3["applications"][0]
            app["args"]["storage"] = {"backend": "s3", "s3_bucket": "cluster-images",
                                      "s3_endpoint_url": endpoint}  # fmt: skip
            app["runtime_env"]["env_vars"].update(aws)
            on_worker(s3)
            written = url_images()
            assert all("X-Amz-Signature" in url for url, _ in written)
            serve_cluster.deploy(s3)  # the ingress back on the head
            assert running_nodes(INGRESS) == [serve_cluster.head_id]
            for url, content in written:
                response = httpx.get(url, timeout=30)
                assert response.status_code == 200 and response.content == content
            assert url_images(1)[0][1][:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            httpx.post(f"{endpoint}/moto-api/reset")  # moto's state is per process: leave none
            server.stop()
    finally:
        serve_cluster.deploy()


def _aws_kwargs(env: dict) -> dict:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
