"""Unit-test fixtures: the ingress app over a fake model client (no Ray, no torch)."""

import asyncio
import pickle

import pytest
from PIL import Image
from starlette.testclient import TestClient

import serve_app.ingress as ingress_module
from serve_app.codec import encode_image
from serve_app.config import AppArgs
from serve_app.contract import Accepted, Completed, GenerationResult, PartialImage
from serve_app.ingress import ImagesIngress

MODEL = "flux-kontext-tiny"


class RayStartedInUnitTest(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Unit tests start no Ray: starting or joining one raises (ray.init, which serve.run /
    serve.start and Ray's auto-init call; a node, which ray.cluster_utils.Cluster starts).
    Importing ray and ray.serve modules, decorators and schemas stays free. A test that needs
    Ray belongs in tests/integration."""
    import ray
    import ray._private.node
    import ray._private.worker
    import ray.serve
    import ray.serve.api

    def refuse(*args, **kwargs):
        raise RayStartedInUnitTest(
            "tests/unit start no Ray (ray.init, serve.run, serve.start, a node): "
            "move this test to tests/integration"
        )

    for owner, name in [
        (ray, "init"),
        (ray._private.worker, "init"),
        (ray._private.node.Node, "__init__"),
        (ray.serve, "run"),
        (ray.serve, "start"),
        (ray.serve.api, "run"),
        (ray.serve.api, "start"),
    ]:
        monkeypatch.setattr(owner, name, refuse)


def solid(seed: int, job) -> bytes:
    """An image whose colour encodes its seed, at the job's size."""
    return encode_image(Image.new("RGB", (job.width, job.height), (seed % 256, 7, 9)), "png")


class FakeStream:
    def __init__(self, events):
        self._events = iter(events)
        self.cancelled = False

    async def __anext__(self):
        await asyncio.sleep(0)
        event = next(self._events, None)
        if event is None:
            raise StopAsyncIteration
        if isinstance(event, Exception):
            raise event
        return event

    def cancel(self):
        self.cancelled = True


class FakeModel:
    """Answers like a model replica; `fail` is raised (after a pickle round trip, as Ray would
    deliver it) instead; `fail_mid_stream` ends a stream with an error after its first preview."""

    def __init__(self):
        self.jobs, self.fail, self.fail_mid_stream, self.delay = [], None, None, 0.0

    def _result(self, job):
        return GenerationResult([solid(s, job) for s in job.seeds], 5, [job.n])

    async def generate(self, job):
        self.jobs.append(job)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise pickle.loads(pickle.dumps(self.fail))
        return self._result(job)

    async def check_request(self, request):
        return 5

    def stream(self, job):
        self.jobs.append(job)
        events = [Accepted(5)]
        for index, _ in enumerate(job.preview_steps):
            events += [PartialImage(i, index, solid(200 + i, job)) for i in range(job.n)]
            if self.fail_mid_stream:
                events.append(self.fail_mid_stream)
        events.append(Completed(self._result(job)))
        return FakeStream(events)


class Recorder:
    """Stands in for a Ray metric: remembers (value, tags) of every call."""

    def __init__(self):
        self.calls = []

    def inc(self, value=1, tags=None):
        self.calls.append((value, tags))

    observe = inc
    set = inc


class RecordingMetrics:
    def __init__(self):
        for name in ("requests", "latency", "images", "tokens_in", "tokens_out", "rejected"):
            setattr(self, name, Recorder())


@pytest.fixture
def fake():
    return FakeModel()


@pytest.fixture
def app_args(tmp_path) -> dict:
    """AppArgs for the fake app; tests may change them before `ingress` is built."""
    return {"storage": {"local_dir": str(tmp_path)}, "limits": {"request_timeout_s": 2}}


def ingress_for(app_args: dict, fake: FakeModel) -> ImagesIngress:
    args = AppArgs.model_validate(app_args)
    return ImagesIngress(args.model_dump(), {MODEL: fake}, client_factory=lambda model: model)


@pytest.fixture
def ingress(fake, app_args, monkeypatch):
    monkeypatch.setattr(ingress_module, "IngressMetrics", RecordingMetrics)
    return ingress_for(app_args, fake)


@pytest.fixture
def app(ingress):
    return TestClient(ingress.__serve_build_asgi_app__())
