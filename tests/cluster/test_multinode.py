"""The app on a three-node Ray cluster: placement, node loss under load, rolling updates."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
from openai import OpenAI

from tests.cluster.conftest import INGRESS, MODEL, replicas, running_nodes, wait_for
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

    def __init__(self, serve_cluster, threads: int = 3) -> None:
        self.serve_cluster = serve_cluster
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
        stream = index % 2 == 1
        while not self.stop.is_set():
            with self.lock:
                self.sent += 1
            outcome = self.streamed() if stream else self.plain(client)
            with self.lock:
                self.outcomes.append((time.monotonic(), outcome))

    def plain(self, client: OpenAI) -> str:
        try:
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
    with Load(serve_cluster, threads=2) as load:
        time.sleep(2)
        serve_cluster.deploy(changed)
        wait_for(
            lambda: (
                len(serve_cluster.wait_replicas(2)) == 2
                and not ids & {r["replica_id"] for r in replicas(MODEL)}
            ),
            240,
            "every replica replaced",
        )
        time.sleep(2)
    assert load.counts() and set(load.counts()) == {"ok"}, load.counts()
    after = (
        client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 7}).data[0].b64_json
    )
    assert (pixels(before) != pixels(after)).any()  # the new setting is what runs now
