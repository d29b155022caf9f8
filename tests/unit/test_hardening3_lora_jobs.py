"""Hardening of LoRA adapters and jobs: adapter names PEFT cannot hold as module names, adapter
files of NaN/Inf weights (the replica on the real tiny pipeline), concurrent deletes of one
running job and the `max_queued` bound counting jobs consumers took (a real redis-server)."""

import asyncio
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from serve_app.adapters import AdapterRegistry, pipeline_name
from serve_app.config import LoraConfig
from serve_app.contract import AdapterRef, APIError
from serve_app.jobs.store import JobStore, QueueFull
from serve_app.lora_synthetic import write_adapter
from serve_app.model import ImageModel
from tests.conftest import make_job, write_test_adapters
from tests.unit.conftest import ingress_for
from tests.unit.test_jobs import ASYNC, queued, redis_url, store  # noqa: F401 - fixtures

# --- adapter names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["style.v2", "anime.v2.1", "train", "forward", "a-b", "x"])
def test_every_valid_adapter_name_has_a_pipeline_name_peft_accepts(name):
    inner = pipeline_name(name)
    assert "." not in inner and inner.replace("_", "").isalnum()
    assert inner != name  # never a module attribute such as `train` or `forward`
    assert pipeline_name(name) == inner  # the same on every replica and every load


def test_names_that_differ_only_in_dots_keep_distinct_pipeline_names():
    names = ["a.b", "a_b", "a-b", "a.b.c", "a_b_c", "a.b_c"]
    assert len({pipeline_name(name) for name in names}) == len(names)


# --- the replica on the tiny pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_cache_dir):
    path = tmp_path_factory.mktemp("adapters")
    transformer = write_test_adapters(path, tiny_cache_dir)
    shutil.copy(path / "a.safetensors", path / "style.v2.safetensors")  # `a` under a file name
    shutil.copy(path / "b.safetensors", path / "train.safetensors")  # an nn.Module attribute
    write_adapter(transformer, path / "nan.safetensors", seed=5, poison=float("nan"))
    write_adapter(transformer, path / "inf.v1.safetensors", seed=6, poison=float("inf"))
    return path


@pytest.fixture(scope="module")
def replica(tiny_cache_dir, adapter_dir):
    config = {"id": "tiny", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup": False,
              "lora": {"dirs": [str(adapter_dir)]}}  # fmt: skip
    return ImageModel(config)


def run(replica, *adapters, seed=1) -> bytes:
    job = make_job(seeds=(seed,), width=64, height=64, adapters=tuple(adapters))
    [image] = asyncio.run(replica.generate(job)).images
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_adapter_named_like_a_file_with_dots_is_listed_loads_and_changes_the_image(
    replica, adapter_dir
):
    registry = AdapterRegistry("tiny", LoraConfig(dirs=[str(adapter_dir)]))
    assert {"style.v2", "train", "inf.v1"} <= set(registry.names())
    base = run(replica)
    dotted = run(replica, AdapterRef("style.v2", 1.0))
    assert (pixels(dotted) != pixels(base)).mean() > 0.3
    assert dotted == run(replica, AdapterRef("a", 1.0))  # the same weights as `a`: same image
    assert "style.v2" in replica.loaded_adapters()
    both = run(replica, AdapterRef("style.v2", 1.0), AdapterRef("train", 0.5))
    assert both not in (base, dotted, run(replica, AdapterRef("train", 1.0)))
    assert run(replica) == base  # base weights again after the adapters ran


@pytest.mark.parametrize("name", ["nan", "inf.v1"])
def test_an_adapter_of_non_finite_weights_is_a_422_naming_it_and_the_replica_serves_on(
    replica, name
):
    before = replica.loaded_adapters()
    base = run(replica)
    with pytest.raises(APIError) as info:
        run(replica, AdapterRef(name, 1.0))
    error = info.value
    assert (error.status, error.code, error.param) == (422, "adapter_invalid", "lora")
    assert repr(name) in error.message and "NaN or infinite" in error.message
    assert replica.loaded_adapters() == before  # nothing was injected
    replica.check_health()
    assert run(replica) == base
    assert (pixels(run(replica, AdapterRef("a", 1.0))) != pixels(base)).mean() > 0.3


# --- concurrent deletes of one running job ---------------------------------------------------


def test_concurrent_deletes_of_a_running_job_each_answer_cancelled_or_deleted(
    redis_url,  # noqa: F811 - the fixture
    fake,
    app_args,
):
    app_args["jobs"] = {"redis_url": redis_url, "max_queued": 1000}
    app_args["limits"]["request_timeout_s"] = 60  # shared CPUs: never a 504 here
    ingress = ingress_for(app_args, fake)
    consumer = JobStore(redis_url, 60, 1000)  # the consumer's view
    consumer.redis.flushdb()
    app = ingress.__serve_build_asgi_app__()
    body = {"prompt": "a cat", "size": "256x256"}

    async def one_round(client: httpx.AsyncClient) -> list[httpx.Response]:
        answer = await client.post("/v1/images/generations", json=body, headers=ASYNC)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        assert consumer.start(job_id, "a consumer") == "started"

        async def delete(delay: float) -> httpx.Response:
            await asyncio.sleep(delay)
            return await client.delete(f"/v1/images/jobs/{job_id}")

        return await asyncio.gather(*(delete(i * 0.0005) for i in range(12)))

    async def rounds() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [r for _ in range(30) for r in await one_round(client)]

    # A delete cancels the job (200, the job cancelled), deletes it once cancelled (200,
    # deleted), or arrives when it is gone (404, as one after the other would): never a 200
    # that says it still runs.
    said = []
    for answer in asyncio.run(rounds()):
        body = answer.json()
        if answer.status_code == 404:
            said.append(body["error"]["code"])
        else:
            assert answer.status_code == 200, answer.text
            said.append(body["object"] if body.get("deleted") else body["status"])
    assert set(said) <= {"cancelled", "image.job.deleted", "job_not_found"}, said
    assert said.count("cancelled") == 30 and "image.job.deleted" in said, said


# --- the bound on waiting jobs ---------------------------------------------------------------


def test_jobs_consumers_took_still_count_until_the_model_starts_them(store):  # noqa: F811
    ids = [queued(store)[0] for _ in range(3)]  # max_queued 3
    for job_id in ids:  # consumers take every task off the queue: they wait on the model
        assert store.start(job_id, "consumer") == "started"
    assert store.queue_length() == 0 and store.waiting() == 3
    with pytest.raises(QueueFull):
        queued(store)
    store.touch(ids, {})  # heartbeats without progress: still waiting
    with pytest.raises(QueueFull):
        queued(store)
    store.touch(ids[:1], {ids[0]: 0.25})  # the model ran its first step
    assert store.waiting() == 2
    fourth, _ = queued(store)
    with pytest.raises(QueueFull):
        queued(store)
    assert store.finish(ids[1], "failed") == "ok"  # done before any progress was seen
    fifth, _ = queued(store)
    assert store.cancel(fourth) == "queued" and store.cancel(ids[2]) == "in_progress"
    assert store.waiting() == 1  # fifth
    assert store.requeue(ids[0], "replica died")  # a retry waits for the model again
    assert store.waiting() == 2 and store.waiting("-") == 2
    store.forget(fifth, "-")
    assert store.waiting() == 1


def test_each_key_waits_within_its_share_and_counts_heal_after_outside_deletes(store):  # noqa: F811
    store.max_queued, store.max_queued_per_key = 10, 2
    alice = [queued(store, "alice")[0] for _ in range(2)]
    with pytest.raises(QueueFull) as info:
        queued(store, "alice")
    assert info.value.per_key and info.value.limit == 2
    queued(store, "bob")
    assert store.waiting("alice") == 2 and store.waiting("bob") == 1
    store.redis.delete(f"serve_app:job:{alice[0]}")  # by hand, outside the scripts
    store.stale_running(60)  # the consumers' sweep recounts
    assert store.waiting() == 2 and store.waiting("alice") == 1
    queued(store, "alice")


def test_submissions_past_the_bound_are_429_when_consumers_took_the_tasks(
    redis_url,  # noqa: F811 - the fixture
    fake,
    app_args,
):
    app_args["jobs"] = {"redis_url": redis_url, "max_queued": 2}
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    consumer = JobStore(redis_url, 60, 2)  # the consumer's view
    consumer.redis.flushdb()
    body = {"prompt": "a cat", "size": "256x256"}
    for _ in range(2):
        answer = app.post("/v1/images/generations", json=body, headers=ASYNC)
        assert answer.status_code == 202, answer.text
        assert consumer.start(answer.json()["id"], "consumer") == "started"
    assert consumer.queue_length() == 0  # nothing left for the broker's queue length to see
    refused = app.post("/v1/images/generations", json=body, headers=ASYNC)
    assert refused.status_code == 429 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "2 jobs wait for the model" in error["message"]


def test_a_per_key_share_is_a_429_saying_so(redis_url, fake, app_args):  # noqa: F811
    app_args["jobs"] = {"redis_url": redis_url, "max_queued": 10, "max_queued_per_key": 1}
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    JobStore(redis_url, 60, 10).redis.flushdb()
    body = {"prompt": "a cat", "size": "256x256"}
    assert app.post("/v1/images/generations", json=body, headers=ASYNC).status_code == 202
    refused = app.post("/v1/images/generations", json=body, headers=ASYNC)
    assert refused.status_code == 429
    assert "of this API key" in refused.json()["error"]["message"]
