"""Jobs without Ray: the Redis job store on a real redis-server, the ingress's job routes over a
fake model (ownership, 503 without Redis), webhook signing and destinations, payloads."""

import json
import shutil
import socket
import subprocess
import threading
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from serve_app.config import WebhookConfig
from serve_app.contract import AdapterRef, ModelRequest
from serve_app.jobs.record import JobRecord, JobStatus
from serve_app.jobs.store import JobStore, QueueFull, new_job_id
from serve_app.jobs.webhooks import WebhookRefused, check_destination, secret_bytes, sign
from tests.unit.conftest import ingress_for

ASYNC = {"Prefer": "respond-async"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server for this module (Debian's, installed by scripts/setup.sh)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: bash scripts/setup.sh --tests installs it")
    port = free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.kill()
    process.wait()


@pytest.fixture
def store(redis_url):
    store = JobStore(redis_url, result_ttl_s=60, max_queued=3)
    store.redis.flushdb()
    return store


def queued(store, owner="-", payload=b"payload", **extra):
    record = JobRecord(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        owner=owner,
        created_at=time.time(),
        model="m",
        endpoint="generations",
        **extra,
    )
    return record.id, store.submit(record, payload)


# --- the store -------------------------------------------------------------------------------


def test_jobs_queue_in_order_and_a_full_queue_refuses(store):
    positions = [queued(store)[1] for _ in range(3)]
    assert positions == [0, 1, 2]
    with pytest.raises(QueueFull):
        queued(store)
    assert store.queue_length() == 3


def test_a_job_runs_once_finishes_once_and_expires(store):
    job_id, _ = queued(store)
    assert store.start(job_id, "w1") == "started"
    assert store.start(job_id, "w2") == "busy"  # a duplicate delivery while it runs
    assert store.get(job_id).attempts == 1 and store.queue_length() == 0
    assert store.payload(job_id) == b"payload"
    assert store.finish(job_id, "completed", images=("a.png",)) == "ok"
    assert store.finish(job_id, "failed") == "completed"  # a final state is final
    assert store.start(job_id, "w3") == "completed"
    assert store.payload(job_id) is None
    assert 0 < store.redis.ttl(f"serve_app:job:{job_id}") <= 60


def test_a_job_whose_consumer_went_silent_can_be_started_again(store, monkeypatch):
    job_id, _ = queued(store)
    assert store.start(job_id, "w1") == "started"
    store.mark(job_id, heartbeat=time.time() - 60)
    assert store.start(job_id, "w2") == "started"
    assert store.get(job_id).attempts == 2


def test_cancel_beats_finish_and_a_retry_keeps_the_place_in_the_queue(store):
    first, _ = queued(store)
    second, _ = queued(store)
    assert store.start(first, "w") == "started"
    assert store.requeue(first, "replica died")
    assert store.get(first).queue_position == 0 and store.get(second).queue_position == 1
    assert store.start(first, "w") == "started"
    assert store.cancel(first) == "in_progress"
    assert store.touch([first], {first: 0.5}) == {first: True}  # the consumer learns of it
    assert store.finish(first, "completed") == "cancelled"
    assert store.cancel(second) == "queued" and store.start(second, "w") == "cancelled"
    assert store.queue_length() == 0


def test_listing_is_per_owner_newest_first_with_a_cursor(store):
    store.max_queued = 100
    mine = [queued(store, "alice")[0] for _ in range(5)]
    queued(store, "bob")
    page, more = store.list_owned("alice", 2, None)
    assert [r.id for r in page] == mine[::-1][:2] and more
    page, more = store.list_owned("alice", 10, page[-1].id)
    assert [r.id for r in page] == mine[::-1][2:] and not more
    store.forget(mine[0], "alice")
    assert len(store.list_owned("alice", 10, None)[0]) == 4


# --- payloads and webhooks -----------------------------------------------------------------


def test_a_job_payload_round_trips_with_its_images():
    canvas = Image.effect_noise((64, 64), 50).convert("RGB")
    job = ModelRequest("r", "p", 64, 64, 2, 2.5, (1, 2), conditioning=(canvas,),
                   mask=Image.new("L", (64, 64), 255), init_image=canvas,
                   adapters=(AdapterRef("a", 0.5),))  # fmt: skip
    back = ModelRequest.from_json(job.to_json())
    assert back.seeds == (1, 2) and back.adapters == job.adapters
    assert back.conditioning[0].tobytes() == canvas.tobytes()
    assert back.mask.tobytes() == job.mask.tobytes()
    assert b"pickle" not in job.to_json()


def test_webhook_signatures_verify_with_the_standard_webhooks_library():
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = json.dumps({"id": "imgjob_1", "status": "completed"}).encode()
    timestamp = int(time.time())
    signature = sign(secret_bytes(secret), "msg_1", timestamp, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(timestamp),
               "webhook-signature": signature}  # fmt: skip
    assert Webhook(secret).verify(body, headers)["status"] == "completed"
    headers["webhook-signature"] = sign(b"another secret", "msg_1", timestamp, body)
    with pytest.raises(Exception, match="signature"):
        Webhook(secret).verify(body, headers)


@pytest.mark.parametrize(
    "url, config, reason",
    [
        ("http://127.0.0.1:8080/hook", {}, "private"),
        ("http://169.254.169.254/latest", {}, "private"),
        ("http://10.1.2.3/x", {}, "private"),
        ("http://[::1]/x", {}, "private"),
        ("http://[64:ff9b::a9fe:a9fe]/x", {}, "private"),  # NAT64 of 169.254.169.254
        ("http://[2002:7f00:1::]/x", {}, "private"),  # 6to4 of 127.0.0.1
        ("http://a..b/x", {}, "does not resolve"),  # not even IDNA: never a 500
        ("ftp://example.com/x", {}, "http or https"),
        ("https://user:pw@example.com/x", {}, "credentials"),
        ("https://evil.example.org/x", {"allowed_hosts": ["*.example.com"]}, "allowlist"),
    ],
)
def test_webhook_destinations_are_checked(url, config, reason):
    with pytest.raises(WebhookRefused, match=reason):
        check_destination(url, WebhookConfig(**config))


def test_private_destinations_pass_when_allowed():
    check_destination("http://127.0.0.1:8080/hook", WebhookConfig(allow_private=True))
    allowed = WebhookConfig(allow_private=True, allowed_hosts=["localhost", "127.0.0.1"])
    check_destination("http://127.0.0.1/hook", allowed)


# --- the ingress over a fake model ---------------------------------------------------------


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("alice: sk-alice\nbob: sk-bob\n")
    return path


def test_a_job_belongs_to_the_key_that_created_it(redis_url, fake, app_args, keys_file):
    JobStore(redis_url, 60, 10).redis.flushdb()
    app_args["auth"] = {"api_keys_file": str(keys_file)}
    app_args["jobs"] = {"redis_url": redis_url}
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    alice, bob = ({"Authorization": f"Bearer sk-{n}"} for n in ("alice", "bob"))
    body = {"prompt": "a cat", "size": "256x256"}
    answer = app.post("/v1/images/generations", json=body, headers={**ASYNC, **alice})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    assert fake.jobs == []  # queued for a consumer, not run by the ingress
    assert app.get(f"/v1/images/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    for method in (app.get, app.delete):
        other = method(f"/v1/images/jobs/{job_id}", headers=bob)
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert app.get("/v1/images/jobs", headers=bob).json()["data"] == []
    assert [j["id"] for j in app.get("/v1/images/jobs", headers=alice).json()["data"]] == [job_id]
    assert app.get(f"/v1/images/jobs/{job_id}").status_code == 401
    cancelled = app.delete(f"/v1/images/jobs/{job_id}", headers=alice).json()
    assert cancelled["status"] == "cancelled"


def test_without_redis_submission_is_a_503_and_sync_still_works(fake, app_args):
    app_args["jobs"] = {"redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    body = {"prompt": "a cat", "size": "256x256"}
    answer = app.post("/v1/images/generations", json=body, headers=ASYNC)
    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert answer.json()["error"]["code"] == "jobs_unavailable"
    assert "Synchronous requests still work" in answer.json()["error"]["message"]
    assert app.post("/v1/images/generations", json=body).status_code == 200
    assert app.get("/v1/images/jobs/imgjob_" + "0" * 24).status_code == 503  # a real id's shape


def test_jobs_turned_off_answer_synchronously(fake, app_args):
    app_args["jobs"] = {"enabled": False}
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    answer = app.post("/v1/images/generations", json={"prompt": "p"}, headers=ASYNC)
    assert answer.status_code == 200 and "preference-applied" not in answer.headers
    assert app.get("/v1/images/jobs").status_code == 404


def test_without_a_configured_redis_jobs_say_what_to_set(fake, app_args, monkeypatch):
    monkeypatch.delenv("SERVE_APP_REDIS_URL", raising=False)
    app_args["jobs"] = {"embedded": False}
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    answer = app.post("/v1/images/generations", json={"prompt": "p"}, headers=ASYNC)
    assert answer.status_code == 503 and "SERVE_APP_REDIS_URL" in answer.json()["error"]["message"]
    assert app.post("/v1/images/generations", json={"prompt": "p"}).status_code == 200


def test_a_running_job_whose_consumer_and_task_were_lost_is_found_once(store):
    job_id, _ = queued(store)
    assert store.start(job_id, "w1") == "started"
    assert store.stale_running(30) == []  # its heartbeat is fresh
    store.mark(job_id, heartbeat=time.time() - 60)
    store.redis.zadd(store.RUNNING, {job_id: time.time() - 60})
    assert store.stale_running(30) == [job_id]
    assert store.stale_running(30) == []  # claimed: one fresh task per period
    assert store.finish(job_id, "completed") == "ok"
    assert store.redis.zscore(store.RUNNING, job_id) is None


def test_the_consumer_gives_lost_jobs_a_fresh_task(redis_url, app_args):
    from serve_app.config import AppArgs
    from serve_app.jobs.consumer import ImageJobConsumer
    from serve_app.jobs.queue import TASK_NAME

    app_args["jobs"] = {"redis_url": redis_url, "visibility_timeout_s": 10}
    consumer = ImageJobConsumer(AppArgs.model_validate(app_args).model_dump(), {})
    consumer._stopped.set()  # no background heartbeats in this test

    class Adapter:
        sent = []

        def enqueue_task_sync(self, name, args=None, **options):
            self.sent.append((name, args))

    consumer._adapter = Adapter()
    store = consumer.store
    store.redis.flushdb()
    job_id, _ = queued(store)
    store.start(job_id, "a consumer that died")
    store.mark(job_id, heartbeat=time.time() - 100)
    store.redis.zadd(store.RUNNING, {job_id: time.time() - 100})
    assert consumer.sweep() == [job_id]
    assert Adapter.sent == [(TASK_NAME, [job_id])]
    assert store.start(job_id, "another") == "started"  # the fresh task can run it


class EndlessStream:
    """A model stream that accepts the job and then reports progress until cancelled, as a
    model replica does for a job far too big for the time limit."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def __iter__(self):
        from serve_app.contract import Accepted, Progress

        yield Accepted(text_tokens=5)
        step = 0
        while not self.cancelled.wait(0.05):
            step += 1
            yield Progress(step, 10_000)
        raise RuntimeError("the request was cancelled")  # what Ray raises after cancel()

    def cancel(self) -> None:
        self.cancelled.set()


class EndlessModel:
    def __init__(self) -> None:
        self.streams: list[EndlessStream] = []
        self.generate_stream = self

    def options(self, **_):
        return self

    def remote(self, job):
        self.streams.append(EndlessStream())
        return self.streams[-1]


def test_a_job_past_its_time_limit_fails_with_job_timeout_and_frees_the_model(redis_url, app_args):
    from serve_app.config import AppArgs
    from serve_app.jobs.consumer import ImageJobConsumer

    app_args["jobs"] = {"redis_url": redis_url, "timeout_s": 1.5}
    model = EndlessModel()
    consumer = ImageJobConsumer(AppArgs.model_validate(app_args).model_dump(), {"m": model})
    try:
        store = consumer.store
        store.redis.flushdb()
        job = ModelRequest("r", "a cat", 64, 64, 10_000, 2.5, (1,))
        job_id, _ = queued(store, payload=job.to_json())
        started = time.monotonic()
        assert consumer.run_image_job(job_id) == "failed"
        took = time.monotonic() - started
        assert 1.5 <= took < 5, f"stopped after {took:.1f}s"
        [stream] = model.streams
        assert stream.cancelled.is_set(), "the model's request was not cancelled"
        record = store.get(job_id)
        assert record.status == "failed"
        assert record.error.code == "job_timeout" and "1.5 s" in record.error.message
    finally:
        consumer._stopped.set()


def test_a_job_time_limit_defaults_to_the_request_time_limit(redis_url, app_args):
    from serve_app.config import AppArgs
    from serve_app.jobs.consumer import ImageJobConsumer

    app_args["jobs"] = {"redis_url": redis_url}
    app_args["limits"] = {"request_timeout_s": 42}
    consumer = ImageJobConsumer(AppArgs.model_validate(app_args).model_dump(), {})
    consumer._stopped.set()
    assert consumer.timeout_s == 42
