"""The jobs wing's typed contract: every field of a model request, a resolved request and a job
record round-trips; the Lua scripts use the record's names; the consumer runs jobs through an
injected model client (no Ray; a real Redis from `test_jobs`)."""

import dataclasses
import time

import pytest
from PIL import Image

from serve_app.config import AppArgs
from serve_app.contract import (
    Accepted,
    AdapterRef,
    APIError,
    Completed,
    GenerationResult,
    ModelRequest,
    Progress,
)
from serve_app.dataclass_json import SKIP
from serve_app.jobs import store as store_module
from serve_app.jobs.record import FIELD, JobError, JobRecord, JobStatus, lua
from serve_app.protocol import InputTokensDetails, Usage
from serve_app.resolution import ResolvedGeneration
from tests.unit.conftest import solid
from tests.unit.test_jobs import queued, redis_url  # noqa: F401 - fixtures
from tests.unit.test_model_client import Stream


def non_default(cls, sample) -> None:
    """Every field the sample sets differs from its default: a new field must join the test."""
    for field in dataclasses.fields(cls):
        if field.metadata == SKIP or field.default is dataclasses.MISSING:
            continue
        assert getattr(sample, field.name) != field.default, f"set {cls.__name__}.{field.name}"


def a_model_request() -> ModelRequest:
    canvas = Image.effect_noise((64, 48), 40).convert("RGB")
    return ModelRequest(
        request_id="req-1",
        prompt="a cat on a mat",
        width=64,
        height=48,
        steps=3,
        guidance=3.5,
        seeds=(7, 8),
        output_format="webp",
        output_compression=80,
        conditioning=(canvas,),
        init_image=canvas.rotate(90),
        mask=Image.new("L", (64, 48), 255),
        preview_steps=(1, 2),
        first_image_index=4,
        adapters=(AdapterRef("a", 0.5), AdapterRef("b", 1.25)),
        references_key="0123abcd",
        report_progress=True,
        moderation="low",
        moderation_inputs=(canvas.rotate(180), Image.new("RGB", (8, 8), (1, 2, 3))),
    )


def a_resolved() -> ResolvedGeneration:
    return ResolvedGeneration(
        model_id="m",
        prompt="a dog",
        n=3,
        width=96,
        height=64,
        steps=5,
        guidance=4.0,
        quality="high",
        background="opaque",
        output_format="jpeg",
        output_compression=70,
        seed=41,
        response_format="url",
        stream=True,
        partial_images=2,
        adapters=(AdapterRef("x", 0.75),),
        adapters_param="model",
        references_per_call=True,
        moderation="low",
    )


def test_every_field_of_a_model_request_round_trips_through_json():
    request = a_model_request()
    non_default(ModelRequest, request)
    back = ModelRequest.from_json(request.to_json())
    for field in dataclasses.fields(ModelRequest):
        if field.metadata == SKIP:
            continue
        mine, theirs = getattr(request, field.name), getattr(back, field.name)
        if field.name in ("init_image", "mask"):
            assert (theirs.mode, theirs.size, theirs.tobytes()) == (
                mine.mode,
                mine.size,
                mine.tobytes(),
            )
        elif field.name in ("conditioning", "moderation_inputs"):
            assert [im.tobytes() for im in theirs] == [im.tobytes() for im in mine]
        else:
            assert theirs == mine and type(theirs) is type(mine), field.name
    assert b"pickle" not in request.to_json()


def test_the_replicas_own_fields_never_leave_it():
    import threading

    request = dataclasses.replace(
        a_model_request(), events=print, cancel=threading.Event(), received_at=5.0
    )
    back = ModelRequest.from_json(request.to_json())
    assert back.events is None and back.cancel is None and back.received_at == 0.0


def test_unknown_fields_in_a_queued_request_are_refused():
    import json

    data = json.loads(a_model_request().to_json())
    data["new_field"] = 1
    with pytest.raises(TypeError, match="new_field"):
        ModelRequest.from_json(json.dumps(data))


def test_every_field_of_a_resolved_request_round_trips():
    resolved = a_resolved()
    non_default(ResolvedGeneration, resolved)
    assert ResolvedGeneration.from_json(resolved.to_json()) == resolved


def a_record() -> JobRecord:
    usage = Usage(
        input_tokens=10,
        input_tokens_details=InputTokensDetails(text_tokens=4, image_tokens=6),
        output_tokens=20,
        total_tokens=30,
        prompt_tokens=10,
    )
    return JobRecord(
        id="imgjob_" + "ab" * 12,
        status=JobStatus.COMPLETED,
        model="m",
        endpoint="edits",
        owner="alice",
        created_at=1764590000.25,
        request_id="req-9",
        resolved=a_resolved(),
        input_tokens=6,
        base_url="http://example.test/",
        ttl_s=600,
        webhook_url="https://hooks.example.test/x",
        seq=12,
        attempts=2,
        progress=0.5,
        started_at=1764590001.5,
        heartbeat=1764590002.75,
        worker="replica-1",
        last_error="ActorDiedError",
        cancel=True,
        completed_at=1764590003.125,
        images=("a.png", "b.png"),
        usage=usage,
        created=1764590003,
        batch_sizes=(2, 1),
        error=JobError(message="no", type="invalid_request_error", code="c", param="p"),
        queue_position=3,
    )


def test_every_field_of_a_job_record_round_trips_through_its_hash():
    record = a_record()
    non_default(JobRecord, record)
    fields = record.to_hash()
    assert set(fields) == set(FIELD) and "queue_position" not in fields
    assert all(isinstance(value, str) for value in fields.values())
    back = JobRecord.from_hash(fields, queue_position=3)
    assert back == record


def test_records_from_other_versions_still_read():
    """Fields this version does not know are ignored (a newer writer); numbers written as the
    Lua scripts and older writers do ("1", "0.25", "2.0") read back."""
    fields = {"id": "j", "status": "queued", "model": "m", "endpoint": "generations",
              "owner": "-", "created_at": "1764590000", "attempts": "2.0", "progress": "0",
              "cancel": "1", "some_future_field": "x"}  # fmt: skip
    record = JobRecord.from_hash(fields)
    assert record.attempts == 2 and record.progress == 0.0 and record.cancel is True
    assert record.resolved is None and record.images == ()


def test_partial_updates_are_checked_by_name():
    assert JobRecord.hash_fields(progress=1.0, worker=None) == {"progress": "1.0"}
    with pytest.raises(TypeError, match="progres"):
        JobRecord.hash_fields(progres=1.0)


def test_the_lua_scripts_use_only_the_records_names():
    for name in dir(store_module):
        if name.startswith("_") and name.isupper() and isinstance(getattr(store_module, name), str):
            script = lua(getattr(store_module, name))
            assert "$" not in script, name
    with pytest.raises(KeyError):
        lua("redis.call('HGET', KEYS[1], '$no_such_field')")


# --- the consumer's run path, with a fake model client -------------------------------------


class FakeClient:
    """A model client for the consumer: answers each request like a replica, or fails."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.requests = fail, []

    def stream_sync(self, request):
        self.requests.append(request)
        images = [solid(seed, request) for seed in request.seeds]
        events = [Accepted(5), Progress(1, 2), Progress(2, 2)]
        events.append(self.fail or Completed(GenerationResult(images, 5, [request.n])))
        return Stream(events)


@pytest.fixture
def make_consumer(redis_url, app_args):  # noqa: F811 - the fixture
    from serve_app.jobs.consumer import ImageJobConsumer

    made = []

    def make(client, **jobs):
        app_args["jobs"] = {"redis_url": redis_url, **jobs}
        args = AppArgs.model_validate(app_args).model_dump()
        consumer = ImageJobConsumer(args, {"m": "a handle"}, client_factory=lambda _: client)
        consumer._stopped.set()  # no background heartbeats
        consumer.store.redis.flushdb()
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer._stopped.set()


def submit(consumer, resolved=None) -> str:
    resolved = resolved or dataclasses.replace(
        a_resolved(), stream=False, response_format="b64_json"
    )
    request = resolved.to_model_request("req")
    job_id, _ = queued(consumer.store, payload=request.to_json(), resolved=resolved)
    return job_id


def test_the_consumer_runs_a_job_through_its_model_client(make_consumer):
    client = FakeClient()
    consumer = make_consumer(client)
    job_id = submit(consumer)
    assert consumer.run_image_job(job_id) == "completed"
    [request] = client.requests
    assert request.report_progress and request.seeds == (41, 42, 43)
    record = consumer.store.get(job_id)
    assert record.status == JobStatus.COMPLETED and record.progress == 1.0
    assert len(record.images) == 3 and record.batch_sizes == (3,)
    assert record.usage.input_tokens == 5 and record.attempts == 1
    stored = [consumer.images.get(name) for name in record.images]
    assert stored == [solid(seed, request) for seed in request.seeds]


def test_a_bug_in_the_model_fails_the_job_once_and_is_not_called_a_replica_loss(make_consumer):
    consumer = make_consumer(FakeClient(fail=ValueError("a bug")), max_retries=3)
    job_id = submit(consumer)
    assert consumer.run_image_job(job_id) == "failed"
    record = consumer.store.get(job_id)
    assert record.error.code == "internal_error" and record.attempts == 1
    assert "replica" not in record.error.message


def test_a_models_own_error_fails_the_job_with_it(make_consumer):
    refused = APIError("prompt too long", param="prompt", code="prompt_too_long")
    consumer = make_consumer(FakeClient(fail=refused))
    job_id = submit(consumer)
    assert consumer.run_image_job(job_id) == "failed"
    error = consumer.store.get(job_id).error
    assert (error.code, error.param, error.message) == (
        "prompt_too_long",
        "prompt",
        "prompt too long",
    )


def test_a_moderation_refusal_while_running_fails_the_job_with_openais_object(make_consumer):
    """An output refused in the replica: the job fails with the same error object a synchronous
    request gets, which its job object (and so its webhook) shows; no image is stored."""
    from serve_app.jobs.objects import job_object
    from serve_app.moderation import refusal

    consumer = make_consumer(FakeClient(fail=refusal("output image 2 of 3")))
    job_id = submit(consumer)
    assert consumer.run_image_job(job_id) == "failed"
    record = consumer.store.get(job_id)
    assert not record.images
    shown = job_object(record, consumer.images, "http://testserver/").error
    assert (shown.code, shown.type) == ("moderation_blocked", "image_generation_user_error")
    assert "output image 2 of 3" in shown.message


def test_a_lost_replica_puts_the_job_back_for_a_retry(make_consumer, monkeypatch):
    import celery
    from ray.exceptions import ActorDiedError

    class Task:
        class request:
            retries = 0

    monkeypatch.setattr(celery, "current_task", Task())
    consumer = make_consumer(FakeClient(fail=ActorDiedError()), max_retries=2)
    job_id = submit(consumer)
    with pytest.raises(ActorDiedError):  # re-raised: Celery retries the task
        consumer.run_image_job(job_id)
    record = consumer.store.get(job_id)
    assert record.status == JobStatus.QUEUED and record.last_error == "ActorDiedError"
    assert consumer.store.start(job_id, "next delivery") == "started"  # it may run again


def test_a_job_deleted_before_its_consumer_starts_it_never_reaches_the_model(make_consumer):
    client = FakeClient()
    consumer = make_consumer(client)
    job_id = submit(consumer)
    consumer.store.start(job_id, "elsewhere")
    consumer.store.cancel(job_id)
    assert consumer.run_image_job(job_id) == "cancelled" and client.requests == []


def test_the_queue_records_when_a_job_started(make_consumer):
    consumer = make_consumer(FakeClient())
    job_id = submit(consumer)
    before = time.time()
    consumer.run_image_job(job_id)
    record = consumer.store.get(job_id)
    assert before <= record.started_at <= record.completed_at <= time.time()
