"""The app on a three-node Ray cluster: placement, node loss under load, rolling updates."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
import yaml
from openai import DefaultHttpxClient, OpenAI
from ray.serve.schema import ServeDeploySchema

from tests.cluster.conftest import (
    INGRESS,
    MODEL,
    ROOT,
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


class InFlight:
    """`count` long requests (~3 s each on a node) sent at once through the openai SDK with
    its default retries, one thread each; every HTTP attempt's answer is recorded (an httpx
    event hook), so the 503s the SDK retried are seen too."""

    BODY = {"prompt": PROMPT, "size": "512x512", "n": 4, "extra_body": {"num_inference_steps": 20}}

    def __init__(self, serve_cluster, count: int) -> None:
        self.answers: list[tuple[int, str | None]] = []  # (status, Retry-After) per attempt
        self.results: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
        self.sent = threading.Semaphore(0)
        hooks = {"request": [lambda _: self.sent.release()], "response": [self.answered]}
        self.client = OpenAI(  # max_retries: the SDK's default
            base_url=f"{serve_cluster.url}/v1",
            api_key="unused",
            timeout=120,
            http_client=DefaultHttpxClient(event_hooks=hooks),
        )
        self.threads = [threading.Thread(target=self.run) for _ in range(count)]

    def __enter__(self) -> InFlight:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:  # every request is on the wire
            assert self.sent.acquire(timeout=30), "a request was never sent"
        return self

    def __exit__(self, *exc) -> None:
        for thread in self.threads:
            thread.join(timeout=180)
        assert not any(thread.is_alive() for thread in self.threads), "a request hung"

    def answered(self, response) -> None:
        self.answers.append((response.status_code, response.headers.get("retry-after")))

    def run(self) -> None:
        sent = time.monotonic()
        try:
            outcome = "ok" if self.client.images.generate(**self.BODY).data[0].b64_json else "empty"
        except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
            outcome = f"http {getattr(exc, 'status_code', type(exc).__name__)}"
        self.results.append((sent, time.monotonic(), outcome))


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
        # Six long requests through the SDK (default retries) in flight when the node goes:
        # the router shares them out between the two replicas, so some die with the victim's.
        with InFlight(serve_cluster, count=6) as in_flight:
            time.sleep(1)  # they reach the replicas
            lost_at = time.monotonic()
            serve_cluster.remove_worker(victim)  # no graceful stop: the node is gone
        # Meanwhile the surviving node keeps answering.
        wait_for(lambda: load.counts(since=time.monotonic() - 1).get("ok", 0) >= 3, 60,
                 "successes on the surviving node")  # fmt: skip
        time.sleep(2)
    assert load.sent == len(load.outcomes), "a request went unanswered"
    allowed = {"ok", "http 503", "stream error"}
    assert set(load.counts()) <= allowed, load.counts()
    assert load.counts(since=lost_at).get("ok", 0) >= 3
    print("node loss under load:", load.sent, "sent,", load.counts(), "| in flight:",
          in_flight.results, in_flight.answers)  # fmt: skip

    # Every request in flight during the loss succeeded through the SDK's default retries...
    assert [outcome for *_, outcome in in_flight.results] == ["ok"] * 6, in_flight.results
    assert all(sent < lost_at < answered for sent, answered, _ in in_flight.results)
    # ...which had 503s (with Retry-After) to retry: requests lost with the node were among them.
    errors = [answer for answer in in_flight.answers if answer[0] != 200]
    assert errors and set(errors) == {(503, "1")}, in_flight.answers
    # The bound on errors: a request fails only if it was on the lost replica when the node
    # went. After one failed call the ingress's router drops that replica (ActorDiedError) or
    # probes it before using it again (ActorUnavailableError), so no later request reaches it.
    # Each client thread has one request out at a time: at most one error per thread.
    lost = sum(n for outcome, n in load.counts().items() if outcome != "ok")
    assert lost <= len(load.threads), load.counts()
    assert len(errors) <= len(in_flight.threads), in_flight.answers
    # Serve notices the dead node (Ray's health checks) and drops its replica.
    wait_for(lambda: victim.node_id not in running_nodes(MODEL), 120, "the lost replica gone")

    # A node joins again: Serve brings the deployment back to its target on it.
    replacement = serve_cluster.add_worker()
    nodes = serve_cluster.wait_replicas(2, timeout_s=240)
    assert replacement.node_id in nodes


def rollout_limits(deployment: dict) -> tuple[int, int, int]:
    """(target, surge, batch) of a rolling update of `deployment` (a serve config entry), as
    Ray Serve's deployment_state.py computes them: surge = ceil(max_surge_percent% of target)
    replicas started beside the old ones, batch = max(int(rolling_update_percentage *
    target), 1) replicas replaced at once; Serve's defaults where the config sets neither."""
    from ray.serve._private.config import DeploymentConfig

    defaults = DeploymentConfig.model_fields
    target = deployment["num_replicas"]
    surge_percent = deployment.get("max_surge_percent", defaults["max_surge_percent"].default)
    fraction = deployment.get(
        "rolling_update_percentage", defaults["rolling_update_percentage"].default
    )
    return target, (surge_percent * target + 99) // 100, max(int(fraction * target), 1)


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
    target, surge, batch = rollout_limits(deployment_config(changed, MODEL))
    assert (target, surge, batch) == (2, 0, 1), "the claim below is about a rollout without surge"
    samples: list[list[tuple[str, str]]] = []  # (replica_id, state) per replica, per sample

    def replaced() -> bool:
        states = replicas(MODEL)
        if states:  # empty while the controller rebuilds the app from the new config
            samples.append(sorted((r["replica_id"], getattr(r["state"], "value", r["state"]))
                                  for r in states))  # fmt: skip
        running = {r["replica_id"] for r in states if r["state"] == "RUNNING"}
        return len(running) == 2 and not ids & running

    with Load(serve_cluster, threads=2) as load:
        time.sleep(2)
        serve_cluster.client.deploy_apps(ServeDeploySchema.model_validate(changed))
        wait_for(replaced, 240, "every replica replaced")
        time.sleep(2)
    assert load.counts() and set(load.counts()) == {"ok"}, load.counts()
    changes = [sample for i, sample in enumerate(samples) if not i or sample != samples[i - 1]]
    print("model replicas during the update (changes):", changes)
    # What Ray Serve's rolling update guarantees (deployment_state.py): with no surge it starts
    # a replacement only in the place of a stopped replica, so never more than `target`
    # replicas besides the old ones still stopping (a surge rollout starts new ones beside
    # the old)...
    active = [sum(state != "STOPPING" for _, state in sample) for sample in samples]
    assert samples and max(active) <= target + surge, samples
    # ...and it stops at most `batch` old replicas until their replacements run, so at least
    # target - batch replicas are RUNNING at every moment (replacing both at once leaves none).
    running = [sum(state == "RUNNING" for _, state in sample) for sample in samples]
    assert min(running) >= target - batch, samples
    # The rollout was seen halfway: a new replica beside an old one still serving.
    assert any(
        any(rid not in ids for rid, _ in sample)
        and any(rid in ids and state == "RUNNING" for rid, state in sample)
        for sample in samples
    ), samples
    after = (
        client.images.generate(prompt=PROMPT, size="64x64", extra_body={"seed": 7}).data[0].b64_json
    )
    assert (pixels(before) != pixels(after)).any()  # the new setting is what runs now


def _heavy(client: OpenAI) -> None:
    """One request of four 512x512 images at 20 steps: ~27 work units, ~3 s on a node."""
    client.images.generate(
        prompt=PROMPT, size="512x512", n=4, extra_body={"num_inference_steps": 20}
    )


def _light(client: OpenAI) -> None:
    """One 256x256 image at 2 steps: ~0.3 work units. Six of them batched keep the replica
    busy (~0.5 s a call) rather than the head (a 64x64 image would leave the requests queued
    at the proxy and the ingress, where the default policy does not count them)."""
    client.images.generate(prompt=PROMPT, size="256x256", quality="low")


def test_autoscaling_follows_denoising_work_not_request_counts(serve_cluster):
    """Both policies under the same settings: Serve's default target (2 ongoing requests per
    replica), WorkPolicy's target (5 units) and upscale delay (10 s) as configs/local.yaml
    ships them, the same delays and look-back for both. One client of heavy requests (1
    request, ~27 units) scales WorkPolicy out and leaves the default policy at one replica; six
    clients of light ones (~6 requests, ~2 units) scale the default policy out and leave
    WorkPolicy at one (after scaling it back in). Every load is 2x or more off the threshold
    of the policy it is measured against, so no result hinges on a tuned target."""
    shipped = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    autoscaling = deployment_config(shipped, MODEL)["autoscaling_config"]
    work_policy = autoscaling["policy"]
    config = copy.deepcopy(serve_cluster.config)
    model = deployment_config(config, MODEL)
    del model["num_replicas"]
    settings = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2,  # Serve's default
        "upscale_delay_s": autoscaling["upscale_delay_s"],  # 10 s
        "downscale_delay_s": 20,  # local.yaml's 120 s would make this test 4 minutes longer
        "look_back_period_s": 10,  # Serve's defaults (30 s; metrics every 10 s) shortened
        "metrics_interval_s": 1,
    }
    # A policy that wants two replicas has decided so this long after its load began (the
    # look-back fills, the delay passes; ~15 s measured here, for either policy).
    react_s = settings["look_back_period_s"] + settings["upscale_delay_s"] + 20

    def replicas_wanted() -> int:  # not stopping: a decision to scale out shows as STARTING
        return sum(r["state"] != "STOPPING" for r in replicas(MODEL))

    def one_replica_throughout(load: Load) -> list[int]:
        counts = []
        deadline = time.monotonic() + react_s
        while time.monotonic() < deadline:
            counts.append(replicas_wanted())
            time.sleep(0.5)
        return counts

    def scales_out() -> None:
        wait_for(lambda: replicas_wanted() == 2, react_s, "a decision to scale out")

    started, took = time.monotonic(), []  # seconds into the test at the end of each step

    def step(name: str) -> None:
        took.append((name, round(time.monotonic() - started)))

    try:
        model["autoscaling_config"] = {**settings, "policy": work_policy}
        serve_cluster.deploy(config)
        serve_cluster.wait_replicas(1)
        step("WorkPolicy at 1")
        with Load(serve_cluster, threads=1, request=_heavy) as heavy:
            scales_out()
            step("heavy: WorkPolicy wants 2")
            serve_cluster.wait_replicas(2)  # the new replica loads
        assert set(heavy.counts()) == {"ok"}, heavy.counts()
        with Load(serve_cluster, threads=6, request=_light) as light:
            serve_cluster.wait_replicas(1, timeout_s=settings["downscale_delay_s"] + react_s)
            step("light: WorkPolicy back at 1")
            counts = one_replica_throughout(light)
        assert set(light.counts()) == {"ok"}, light.counts()
        assert max(counts) == 1, counts

        model["autoscaling_config"] = settings  # Serve's default policy
        serve_cluster.deploy(config)
        serve_cluster.wait_replicas(1)
        step("default policy at 1")
        with Load(serve_cluster, threads=1, request=_heavy) as heavy:
            counts = one_replica_throughout(heavy)
        assert set(heavy.counts()) == {"ok"}, heavy.counts()
        assert max(counts) == 1, counts
        with Load(serve_cluster, threads=6, request=_light) as light:
            scales_out()
        step("light: default policy wants 2")
        assert set(light.counts()) == {"ok"}, light.counts()
        print("autoscaling steps (name, s):", took)
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
