"""Asynchronous jobs end to end: `Prefer: respond-async` through the SDK and raw HTTP, polling,
cancelling, listing, webhooks to a receiver that verifies signatures, backpressure, and the
processes a job must outlive (ingress, consumer, model replica, Redis) killed under it."""

import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from tests.conftest import assert_batch_equivalent, pixels
from tests.integration.conftest import JOBS, WEBHOOK_SECRET, redis_client

pytestmark = pytest.mark.integration

ASYNC = {"Prefer": "respond-async"}
FINAL = ("completed", "failed", "cancelled")
QUICK = {"prompt": "a red fox", "size": "128x128", "quality": "low", "seed": 11}


def sdk(body: dict) -> dict:
    """A body as openai SDK arguments: extensions go in extra_body."""
    known = ("prompt", "size", "quality", "n", "model", "response_format", "output_format")
    fields = {k: v for k, v in body.items() if k in known}
    return {**fields, "extra_body": {k: v for k, v in body.items() if k not in known}}


SLOW = {"prompt": "a slow fox", "size": "512x512", "num_inference_steps": 60, "seed": 3}
# Killed under, then run again to the end: several seconds on the model here, so that most of
# it is left when `wait_on_the_model` sees it run (heartbeats store progress every 0.5 s).
KILLABLE = {**SLOW, "size": "640x640", "num_inference_steps": 100}
# Killed under and never finished: as long as the limits allow (~20 s an attempt here).
DOOMED = {**SLOW, "size": "1024x1024", "num_inference_steps": 100}


def submit(http, body, path="/v1/images/generations", **kwargs) -> dict:
    answer = http.post(path, json=body, headers=ASYNC, **kwargs)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/images/jobs/{job['id']}"
    assert answer.headers["preference-applied"] == "respond-async"
    return job


def poll(http, job_id, until=FINAL, timeout_s=120, check=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/v1/images/jobs/{job_id}").json()
        if check:
            check(job)
        if job.get("status") in until:
            return job
        assert time.monotonic() < deadline, f"job still {job.get('status')}: {job}"
        time.sleep(0.1)


def actors(part: str) -> list:
    import ray

    return [
        ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if part in actor["name"] and "REPLICA" in actor["name"]
    ]


def wait_on_the_model(http, job_id, attempt=1, timeout_s=120, most=0.5) -> dict:
    """The job's state once the model certainly runs its attempt `attempt`: its stored progress
    rose between two readings of that attempt (a value left over from an earlier attempt cannot
    rise), with at most `most` of its steps done, so that the rest outlasts a kill sent now."""
    deadline = time.monotonic() + timeout_s
    last = 0.0
    while True:
        state = http.get(f"/v1/images/jobs/{job_id}").json()
        assert state["status"] not in FINAL, f"the job ended before attempt {attempt}: {state}"
        progress = state["progress"] if state["attempts"] == attempt else 0.0
        if state["status"] == "in_progress" and 0 < last < progress:
            assert progress <= most, f"attempt {attempt} seen running only at {progress:.0%}"
            return state
        last = progress if state["status"] == "in_progress" else 0.0
        assert time.monotonic() < deadline, f"attempt {attempt} never seen running: {state}"
        time.sleep(0.1)


def kill(part: str) -> None:
    import ray

    found = actors(part)
    assert found, f"no replica of {part}"
    for actor in found:
        ray.kill(actor, no_restart=True)


def png(color="teal", size=(128, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


# --- the API ---------------------------------------------------------------------------------


def test_a_job_through_the_sdk_equals_the_synchronous_answer(client, http):
    sync = client.images.generate(**sdk(QUICK))
    raw = client.images.with_raw_response.generate(**sdk(QUICK), extra_headers=ASYNC)
    assert raw.http_response.status_code == 202
    accepted = json.loads(raw.http_response.text)
    assert accepted["object"] == "image.job" and accepted["status"] == "queued"
    assert accepted["model"] == "flux-kontext-tiny" and accepted["endpoint"] == "generations"
    assert accepted["queue_position"] == 0
    job = poll(http, accepted["id"])
    assert job["status"] == "completed" and job["progress"] == 1 and job["attempts"] == 1
    assert job["started_at"] >= job["created_at"] and job["completed_at"] >= job["started_at"]
    result = job["result"]
    assert [d["b64_json"] for d in result["data"]] == [d.b64_json for d in sync.data]
    assert result["usage"] == sync.usage.model_dump(exclude_none=True)
    assert (result["size"], result["quality"]) == (sync.size, sync.quality)


def test_progress_rises_from_the_denoising_steps(http):
    seen = []
    job = submit(http, {**SLOW, "num_inference_steps": 100})
    poll(http, job["id"], check=lambda j: seen.append((j["status"], j["progress"])))
    running = [p for status, p in seen if status == "in_progress"]
    assert any(0 < p < 1 for p in running), seen
    assert running == sorted(running)


def test_edits_and_variations_run_as_jobs_too(http):
    files = {"image": ("in.png", png(), "image/png")}
    form = {"prompt": "make it red", "size": "128x128", "quality": "low", "seed": "4"}
    sync = http.post("/v1/images/edits", data=form, files=files).json()
    answer = http.post("/v1/images/edits", data=form, files=files, headers=ASYNC)
    assert answer.status_code == 202, answer.text
    edit = poll(http, answer.json()["id"])
    assert edit["endpoint"] == "edits"
    assert edit["result"]["data"][0]["b64_json"] == sync["data"][0]["b64_json"]
    variation = http.post(
        "/v1/images/variations", data={"size": "128x128", "quality": "low"}, files=files,
        headers=ASYNC,
    )  # fmt: skip
    assert variation.status_code == 202
    assert poll(http, variation.json()["id"])["status"] == "completed"


def job_count(http) -> int:
    return len(http.get("/v1/images/jobs?limit=100").json()["data"])


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "p", "size": "7x7"}, 400, "size"),
        ({"prompt": "cat " * 600}, 400, "prompt"),  # over the model's 512 tokens
        ({"prompt": "p", "stream": True}, 400, "stream"),
        ({"prompt": "p", "lora": [{"name": "nope"}]}, 404, "lora"),
        ({"prompt": "p", "webhook_url": "ftp://example.com/hook"}, 400, "webhook_url"),
    ],
)
def test_a_bad_request_gets_the_synchronous_error_and_no_job(http, body, status, param):
    before = job_count(http)
    answer = http.post("/v1/images/generations", json=body, headers=ASYNC)
    assert answer.status_code == status and answer.json()["error"]["param"] == param
    assert job_count(http) == before


def test_webhook_url_needs_an_asynchronous_request(http):
    answer = http.post(
        "/v1/images/generations", json={**QUICK, "webhook_url": "http://127.0.0.1:9/x"}
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "webhook_url"


def test_a_running_job_is_cancelled_and_a_finished_one_deleted_with_its_images(http):
    running = submit(http, SLOW)
    poll(http, running["id"], until=("in_progress",))
    time.sleep(0.5)
    cancelled = http.delete(f"/v1/images/jobs/{running['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    job = poll(http, running["id"])
    assert job["status"] == "cancelled" and job["result"] is None
    started = time.monotonic()
    assert poll(http, submit(http, QUICK)["id"])["status"] == "completed"
    assert time.monotonic() - started < 20  # the model stopped the cancelled call

    done = poll(http, submit(http, {**QUICK, "response_format": "url"})["id"])
    url = done["result"]["data"][0]["url"]
    assert http.get(url).status_code == 200
    deleted = http.delete(f"/v1/images/jobs/{done['id']}")
    assert deleted.json() == {"id": done["id"], "object": "image.job.deleted", "deleted": True}
    assert http.get(f"/v1/images/jobs/{done['id']}").status_code == 404
    assert http.get(url).status_code == 404


def test_jobs_are_listed_newest_first_with_a_cursor(http):
    ids = [submit(http, QUICK)["id"] for _ in range(3)]
    first = http.get("/v1/images/jobs?limit=2").json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    assert all(j["result"] is None for j in first["data"])  # GET a job for its result
    rest = http.get(f"/v1/images/jobs?limit=1&after={first['last_id']}").json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    bad = http.get("/v1/images/jobs?limit=0")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
    assert http.get("/v1/images/jobs/imgjob_nope").json()["error"]["code"] == "job_not_found"
    for job_id in ids:
        poll(http, job_id)


def test_a_full_queue_answers_429_and_queued_jobs_report_their_place(http):
    heavy = {**SLOW, "num_inference_steps": 100}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda _: http.post("/v1/images/generations", json=heavy, headers=ASYNC), range(40)
        ))  # fmt: skip
    accepted = [a.json()["id"] for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(a.headers["retry-after"] for a in refused)
    assert refused[0].json()["error"]["code"] == "queue_full"
    # `max_queued` bounds the jobs the model has not started, whether a consumer took them off
    # the broker or not (a consumer takes up to 16 at once: the old bound was max_queued + 16).
    # Only jobs that reached a denoising step during the burst free a place: at most one model
    # call of 8 images can start in it (a call of these takes far longer than the burst).
    assert JOBS["max_queued"] <= len(accepted) <= JOBS["max_queued"] + 8, len(accepted)
    jobs = [http.get(f"/v1/images/jobs/{i}").json() for i in accepted]
    waiting = [job for job in jobs if job["status"] == "queued" or not job["progress"]]
    assert len(waiting) <= JOBS["max_queued"], waiting
    positions = [job["queue_position"] for job in jobs if job["status"] == "queued"]
    assert sorted(positions) == list(range(len(positions)))  # those no consumer took yet
    for job_id in accepted:  # cancel the queued and running ones
        http.delete(f"/v1/images/jobs/{job_id}")
    assert {poll(http, job_id)["status"] for job_id in accepted} <= {"cancelled", "completed"}


# --- webhooks ------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on 127.0.0.1 that verifies every delivery with the Standard Webhooks
    library; `fail_first` answers 500 that many times first."""

    def __init__(self, fail_first: int = 0):
        from standardwebhooks.webhooks import Webhook

        self.verifier = Webhook(WEBHOOK_SECRET)
        self.events, self.attempts, self.fail_first = [], 0, fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                payload = receiver.verifier.verify(body, dict(self.headers))  # raises if forged
                receiver.events.append((dict(self.headers), payload))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait(self, count: int, timeout_s: float = 30) -> list:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"{len(self.events)} webhooks, wanted {count}"
            time.sleep(0.1)
        return self.events


def test_finished_jobs_are_posted_signed_and_retried_until_delivered(http):
    receiver = Receiver(fail_first=1)
    job = submit(http, {**QUICK, "webhook_url": receiver.url})
    [(headers, payload)] = receiver.wait(1)
    assert receiver.attempts == 2  # the first delivery got a 500 and was retried
    assert payload["id"] == job["id"] and payload["status"] == "completed"
    assert payload["result"]["data"][0]["b64_json"]
    assert headers["webhook-id"] == f"{job['id']}_completed"
    assert headers["webhook-signature"].startswith("v1,")

    cancelled = Receiver()
    slow = submit(http, {**SLOW, "webhook_url": cancelled.url})
    poll(http, slow["id"], until=("in_progress",))
    http.delete(f"/v1/images/jobs/{slow['id']}")
    [(_, payload)] = cancelled.wait(1)
    assert payload["status"] == "cancelled"
    receiver.server.shutdown()
    cancelled.server.shutdown()


# --- what a job outlives -------------------------------------------------------------------


def test_a_job_survives_an_ingress_restart(http, base_url, app_cache):
    job = submit(http, KILLABLE)
    wait_on_the_model(http, job["id"])
    killed_at = time.time()
    kill("ImagesIngress")
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = http.get(f"/v1/images/jobs/{job['id']}")
            if answer.status_code == 200:
                break
        except Exception:  # noqa: BLE001 - the new ingress is starting
            pass
        assert time.monotonic() < deadline
        time.sleep(0.5)
    done = poll(http, job["id"])
    assert done["status"] == "completed" and done["attempts"] == 1  # not even run again
    # It finished after the ingress died (the API shows whole seconds; Redis keeps the time).
    finished = redis_client(app_cache).hget(f"serve_app:job:{job['id']}", "completed_at")
    assert float(finished) > killed_at


def test_a_job_survives_its_consumer_dying_mid_job(http):
    job = submit(http, KILLABLE)
    wait_on_the_model(http, job["id"])
    kill("ImageJobConsumer")
    # Redis hands the unacknowledged job out again after visibility_timeout_s; it runs again.
    done = poll(http, job["id"], timeout_s=JOBS["visibility_timeout_s"] + 180)
    assert done["status"] == "completed" and done["attempts"] == 2


def test_a_job_whose_model_replica_dies_is_retried(http):
    job = submit(http, KILLABLE)
    wait_on_the_model(http, job["id"])
    kill("ImageModel")
    done = poll(http, job["id"], timeout_s=180)
    assert done["status"] == "completed" and done["attempts"] == 2


def test_a_job_that_keeps_killing_its_replica_fails_into_the_dead_letter_queue(http, app_cache):
    redis = redis_client(app_cache)
    dead_letters = redis.llen("serve_app_images_failed")
    job = submit(http, DOOMED)
    for attempt in range(1, 4):  # max_retries 2: three attempts
        wait_on_the_model(http, job["id"], attempt)
        kill("ImageModel")
    failed = poll(http, job["id"], timeout_s=60)
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert (
        failed["error"]["code"] == "model_unavailable" and "3 times" in failed["error"]["message"]
    )
    deadline = time.monotonic() + 10
    while redis.llen("serve_app_images_failed") == dead_letters:
        assert time.monotonic() < deadline, "the failed job never reached the dead-letter queue"
        time.sleep(0.2)


def test_redis_killed_loses_no_accepted_job(http, app_cache, client):
    jobs = [submit(http, {**SLOW, "num_inference_steps": 20, "seed": s}) for s in range(4)]
    pid = int((app_cache / "redis" / "redis.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    down = http.post("/v1/images/generations", json=QUICK, headers=ASYNC)
    assert down.status_code == 503 and down.json()["error"]["code"] == "jobs_unavailable"
    assert client.images.generate(**sdk(QUICK)).data  # the synchronous API needs no Redis
    for job in jobs:  # the embedded Redis is restarted from its append-only file
        assert poll(http, job["id"], timeout_s=120)["status"] == "completed"
    assert int((app_cache / "redis" / "redis.pid").read_text()) != pid
    # New jobs run too: a consumer whose Celery worker died with the connection is replaced.
    assert poll(http, submit(http, QUICK)["id"], timeout_s=120)["status"] == "completed"


def test_soak_mixed_sync_and_async_traffic_loses_no_job(http, client):
    """Four clients for 30 s: two synchronous through the SDK, two submitting jobs and polling
    them; every request answered, every job completed, each job's image equal to its request
    made synchronously."""
    stop = time.monotonic() + 30
    sync_done, jobs = [], []

    def sync_client(index):
        while time.monotonic() < stop:
            answer = client.images.generate(**sdk({**QUICK, "seed": index}))
            sync_done.append(answer.data[0].b64_json)

    def async_client(index):
        seed = 100 * index
        while time.monotonic() < stop:
            seed += 1
            job = submit(http, {**QUICK, "seed": seed})
            jobs.append((seed, poll(http, job["id"])))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(sync_client, i) for i in range(2)]
        futures += [pool.submit(async_client, i) for i in (1, 2)]
        for future in futures:
            future.result()
    assert len(sync_done) > 5 and len(jobs) > 5
    assert all(job["status"] == "completed" for _, job in jobs)
    for seed, job in jobs[:4]:  # (a job batched with others rounds slightly differently)
        alone = client.images.generate(**sdk({**QUICK, "seed": seed})).data[0].b64_json
        assert_batch_equivalent(pixels(job["result"]["data"][0]["b64_json"]), pixels(alone))


def test_a_job_and_a_synchronous_request_share_one_pipeline_call(http):
    """The consumer calls the same model deployment: compatible sync and async work batches."""
    body = {**QUICK, "size": "192x192", "seed": 77}
    job = submit(http, body)
    sync = http.post("/v1/images/generations", json={**body, "seed": 78})
    assert sync.headers["x-batch-images"] == "2"  # the job's image and this one
    assert poll(http, job["id"])["status"] == "completed"


def test_jobs_and_webhooks_are_counted_in_metrics(http, metrics_port):
    from tests.integration.test_streaming import settled_sum, wait_for_metric

    completed = 'status="completed"'
    before = settled_sum(metrics_port, "ray_serve_app_jobs_total", completed)
    poll(http, submit(http, QUICK)["id"])
    values = wait_for_metric(
        metrics_port, "ray_serve_app_jobs_total", lambda v: sum(v) > before, completed
    )
    assert sum(values) == before + 1
    assert wait_for_metric(metrics_port, "ray_serve_app_job_queued_seconds_count", bool)
    delivered = 'outcome="delivered"'
    assert wait_for_metric(metrics_port, "ray_serve_app_webhook_deliveries_total", bool, delivered)
