"""The job consumer deployment: Ray Serve's task consumer takes queued jobs from Redis and runs
each through the same model deployment handle the ingress uses, so async and sync requests
batch together.

One handler, `run_image_job(job_id)`, runs on a Celery worker thread of the replica (Ray Serve's
Celery adapter; handlers are synchronous). A heartbeat thread marks the jobs this replica runs
as alive, stores their progress, and cancels the model request of a job deleted meanwhile (the
model stops it at its next denoising step). A job whose model call fails for a reason not its own
(a replica died) is put back in its place and retried by Celery with backoff, at most
`jobs.max_retries` times; then it is `failed` and Celery moves the task to the dead-letter queue.
A consumer killed mid-job leaves its task unacknowledged; Redis hands it out again after
`visibility_timeout_s` and the job runs again (its stale heartbeat says nobody runs it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.task_consumer import task_handler

from serve_app.config import AppArgs
from serve_app.contract import Accepted, APIError, Completed, ModelRequest, Progress
from serve_app.jobs import payload
from serve_app.jobs.metrics import JobMetrics
from serve_app.jobs.queue import TASK_NAME, redis_url
from serve_app.jobs.store import HEARTBEAT_S, STALE_S, JobStore
from serve_app.jobs.webhooks import WebhookSender
from serve_app.resolution import build_usage
from serve_app.storage import make_job_store, url_secret

logger = logging.getLogger("ray.serve")


DRAIN_S = 240  # within the consumer deployment's graceful_shutdown_timeout_s (app.py)
SWEEP_MARGIN_S = 30  # how often, and how long past the visibility timeout, lost jobs are sought


class JobCancelled(Exception):
    """The job was deleted while it ran."""


@dataclasses.dataclass
class Running:
    stream: Any = None
    progress: float = 0.0
    cancelled: bool = False
    deadline: float | None = None  # monotonic; set when the model accepts the job
    timed_out: bool = False


class ImageJobConsumer:
    """Runs queued jobs; `app.build_app` wraps it with `task_consumer(...)`."""

    @staticmethod
    def deployment_options(args: AppArgs) -> dict[str, Any]:
        """Options for `serve.deployment`; a serve config's `deployments:` may override them.
        `args.jobs` is what the autoscaling policy gets: no password, only where to read it."""
        return {
            "name": "ImageJobConsumer",
            "ray_actor_options": {"num_cpus": 0},  # it forwards jobs; the model replicas compute
            "max_ongoing_requests": 16,  # jobs in flight per consumer: enough to fill batches
            "graceful_shutdown_timeout_s": 300,  # running jobs finish before a replica goes
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 4,
                "target_ongoing_requests": 16,
                "policy": {
                    "policy_function": "serve_app.jobs.queue_policy:JobQueuePolicy",
                    "policy_kwargs": {
                        "jobs": args.jobs.model_dump(mode="json"),
                        "poll_interval_s": 5,
                    },
                },
            },
            "logging_config": {"enable_access_log": args.access_log},
        }

    def __init__(self, args: dict, model_handles: dict, embedded_redis: Any = None) -> None:
        """`embedded_redis`: the embedded Redis deployment, bound here so the app deploys it."""
        self.args = AppArgs.model_validate(args)
        config = self.args.jobs
        self.config = config
        self.store = JobStore(redis_url(config), config.result_ttl_s, config.max_queued)
        self.images = make_job_store(
            self.args.storage, config.result_ttl_s, url_secret(self.args.storage)
        )
        self.models = model_handles
        self.metrics = JobMetrics()
        self.webhooks = WebhookSender(config.webhooks, self.metrics.webhook_outcome)
        self.worker = _replica_id()
        self.timeout_s = config.timeout_s or self.args.limits.request_timeout_s
        self._running: dict[str, Running] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._heartbeats, name="job-heartbeat", daemon=True).start()

    @task_handler(name=TASK_NAME)
    def run_image_job(self, job_id: str) -> str:
        state = _with_redis(lambda: self.store.start(job_id, self.worker))
        if state == "busy":
            # A second delivery (the first outlived the visibility timeout) while a consumer
            # still runs the job: look again later, so the job is not lost if that one dies.
            self._adapter.enqueue_task_sync(TASK_NAME, args=[job_id], countdown=2 * STALE_S)
        if state != "started":
            logger.info("job %s not run: %s", job_id, state)
            return state
        record = self.store.get(job_id) or {}
        self.metrics.started(time.time() - float(record.get("created_at", time.time())))
        started = time.monotonic()
        with self._lock:
            self._running[job_id] = running = Running()
        try:
            data = self.store.payload(job_id)
            if data is None:
                raise APIError("The job's request was lost.", status=500, code="internal_error")
            job = dataclasses.replace(payload.job_from_bytes(data), report_progress=True)
            result = self._generate(record["model"], job, running)
            outcome = self._complete(job_id, record, result)
        except JobCancelled:
            outcome = "cancelled"
        except APIError as exc:
            outcome = self._fail(job_id, exc)
        except Exception as exc:  # noqa: BLE001 - a model replica died, Redis blipped, ...
            if running.cancelled:
                outcome = "cancelled"
            else:
                return self._retry_or_fail(job_id, exc)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
            self.metrics.running_s.observe(time.monotonic() - started)
        self.metrics.finished(outcome)
        self._send_webhook(job_id)
        logger.info("job %s %s", job_id, outcome)
        return outcome

    def _generate(self, model_id: str, job: ModelRequest, running: Running):
        handle = self.models[model_id]
        if job.adapters:
            handle = handle.options(multiplexed_model_id=job.adapter_set)
        result = None
        while True:
            running.stream = handle.options(stream=True).generate_stream.remote(job)
            if running.cancelled:  # deleted before the stream existed
                running.stream.cancel()
            try:
                for event in running.stream:
                    if isinstance(event, Accepted) and running.deadline is None:
                        running.deadline = time.monotonic() + self.timeout_s  # heartbeats watch
                    elif isinstance(event, Progress):
                        running.progress = event.fraction
                    elif isinstance(event, Completed):
                        result = event.result
                break
            except BackPressureError:
                time.sleep(1)  # the model deployment is full: wait our turn, not a retry
            except Exception:
                if running.timed_out:
                    raise self._timed_out() from None
                if running.cancelled:
                    raise JobCancelled() from None
                raise
        if running.timed_out:
            raise self._timed_out()
        if running.cancelled or result is None:
            raise JobCancelled()
        return result

    def _timed_out(self) -> APIError:
        return APIError(
            f"The job ran longer than this server's time limit for a job ({self.timeout_s:g} s, "
            "counted from when the model accepted it) and was stopped. Ask for fewer or smaller "
            "images, or fewer steps.",
            status=504,
            code="job_timeout",
        )

    def _complete(self, job_id: str, record: dict[str, str], result) -> str:
        resolved = payload.resolved_from_json(record["resolved"])
        names = [self.images.put(image, resolved.output_format) for image in result.images]
        usage = build_usage(resolved, result.text_tokens, int(record.get("input_tokens", 0)))
        fields = {"images": names, "usage": usage.model_dump(), "created": int(time.time()),
                  "progress": 1, "batch_sizes": result.batch_sizes}  # fmt: skip
        status = _with_redis(lambda: self.store.finish(job_id, "completed", fields))
        if status != "ok":  # deleted while its images were saved
            for name in names:
                self.images.delete(name)
            return "cancelled"
        return "completed"

    def _fail(self, job_id: str, error: APIError) -> str:
        body = {"message": error.message, "type": error.type, "param": error.param,
                "code": error.code}  # fmt: skip
        status = _with_redis(lambda: self.store.finish(job_id, "failed", {"error": body}))
        return "failed" if status == "ok" else "cancelled"

    def _retry_or_fail(self, job_id: str, exc: Exception) -> str:
        """Put the job back for Celery's retry, or, after the last one, fail it; re-raising
        tells Celery which (retry, or failure and the dead-letter queue)."""
        from celery import current_task

        attempt = current_task.request.retries if current_task else self.config.max_retries
        reason = f"{type(exc).__name__}: {exc}"[:2000]  # for the logs; clients get the type
        if attempt >= self.config.max_retries:
            logger.error("job %s failed after %d attempts: %s", job_id, attempt + 1, reason)
            self._fail(
                job_id,
                APIError(
                    f"The model failed {attempt + 1} times running this job (last: "
                    f"{type(exc).__name__}, e.g. a model replica was lost). Submit it again.",
                    status=503,
                    code="model_unavailable",
                ),
            )
            self.metrics.finished("failed")
            self._send_webhook(job_id)
        else:
            logger.warning("job %s attempt %d failed, retrying: %s", job_id, attempt + 1, reason)
            _with_redis(lambda: self.store.requeue(job_id, type(exc).__name__))
            self.metrics.retries.inc()
        raise exc

    def _send_webhook(self, job_id: str) -> None:
        from serve_app.jobs.objects import job_object

        record = self.store.get(job_id)
        if not record or not record.get("webhook_url"):
            return
        body = job_object(record, self.images, base_url=record.get("base_url", ""))
        self.webhooks.send(
            record["webhook_url"], f"{job_id}_{record['status']}", body.model_dump_json().encode()
        )

    def sweep(self) -> list[str]:
        """Give a fresh task to each job whose consumer died and whose own task was lost (not
        handed out again within the visibility timeout). A duplicate is harmless: the second
        task to arrive finds the job taken or done."""
        lost = self.store.stale_running(self.config.visibility_timeout_s + SWEEP_MARGIN_S)
        for job_id in lost:
            logger.warning("job %s lost its consumer and its task: queueing it again", job_id)
            self._adapter.enqueue_task_sync(TASK_NAME, args=[job_id])
        return lost

    def _heartbeats(self) -> None:
        failing = False
        next_sweep = time.monotonic() + SWEEP_MARGIN_S
        while not self._stopped.wait(HEARTBEAT_S / 2):
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_MARGIN_S
                try:
                    self.sweep()
                except Exception as exc:  # noqa: BLE001 - Redis restarting: next time
                    logger.warning("job sweep failed: %s", exc)
            with self._lock:
                running = dict(self._running)
            self._stop_overdue(running)
            try:
                self.metrics.queue_length.set(self.store.queue_length())
                if not running:
                    continue
                progress = {job_id: r.progress for job_id, r in running.items()}
                cancelled = self.store.touch(list(running), progress)
            except Exception as exc:  # noqa: BLE001 - Redis restarting: try again next beat
                if not failing:
                    logger.warning("job heartbeats fail (Redis unreachable?): %s", exc)
                failing = True
                continue
            if failing:
                logger.info("job heartbeats work again")
            failing = False
            for job_id, gone in cancelled.items():
                entry = running[job_id]
                if gone and not entry.cancelled:
                    logger.info("job %s was cancelled: stopping its model request", job_id)
                    entry.cancelled = True
                    if entry.stream is not None:
                        entry.stream.cancel()

    @staticmethod
    def _stop_overdue(running: dict[str, Running]) -> None:
        """Cancel the model request of each job past its time limit (the model stops it at its
        next denoising step; `_generate` then fails the job with `job_timeout`)."""
        now = time.monotonic()
        for job_id, entry in running.items():
            if entry.deadline is not None and now > entry.deadline and not entry.timed_out:
                logger.warning("job %s ran past its time limit: stopping its model request", job_id)
                entry.timed_out = True
                if entry.stream is not None:
                    entry.stream.cancel()

    def check_health(self) -> None:
        """Unhealthy (so Serve replaces the replica) when the Celery worker thread has stopped:
        e.g. kombu's Redis transport can fail while reconnecting after Redis restarts."""
        worker = getattr(getattr(self, "_adapter", None), "_worker_thread", None)
        if worker is not None and not worker.is_alive():
            raise RuntimeError("the Celery worker stopped consuming jobs (lost its broker?)")
        if not any(t.name == "job-heartbeat" and t.is_alive() for t in threading.enumerate()):
            raise RuntimeError("the job heartbeat thread died")

    def __del__(self) -> None:
        """Shutting down (scale-in, update): Serve's task consumer has stopped taking jobs; let
        the running ones finish, within the deployment's graceful shutdown, then put any left
        back in the queue."""
        deadline = time.monotonic() + DRAIN_S
        while self._running and time.monotonic() < deadline:
            time.sleep(0.5)
        with self._lock:
            left = list(self._running)
        for job_id in left:
            try:
                if self.store.requeue(job_id, "consumer stopped"):
                    # A fresh task now, rather than the old one after the visibility timeout
                    # (whichever comes second finds the job taken or done and is dropped).
                    self._adapter.enqueue_task_sync(TASK_NAME, args=[job_id])
            except Exception:  # noqa: BLE001 - Redis gone too: the job goes stale, runs again
                logger.warning("job %s could not be requeued at shutdown", job_id)
        self._stopped.set()


def _with_redis(call, attempts: int = 60):
    """Run a Redis call, waiting out a Redis restart (up to a minute)."""
    import redis

    for attempt in range(attempts):
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if attempt == attempts - 1:
                raise
            time.sleep(1)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve
        return "local"
