"""The job consumer deployment: Ray Serve's task consumer takes queued jobs from Redis and runs
each through the same model client (`serve_app.model_client`) the ingress uses, so async and
sync requests batch together.

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
from collections.abc import Callable
from typing import Any

from ray.serve.task_consumer import task_handler

from serve_app.config import AppArgs
from serve_app.contract import (
    Accepted,
    APIError,
    Completed,
    GenerationResult,
    ModelRequest,
    Progress,
)
from serve_app.jobs.backend import JobBackend
from serve_app.jobs.failures import api_error, replica_lost, with_redis
from serve_app.jobs.objects import job_object
from serve_app.jobs.queue import TASK_NAME
from serve_app.jobs.record import JobError, JobRecord, JobStatus
from serve_app.model_client import ModelClient, RayModelClient, SyncModelStream
from serve_app.resolution import build_usage

logger = logging.getLogger("ray.serve")

SWEEP_MARGIN_S = 30  # how often, and how long past the visibility timeout, lost jobs are sought
BACKPRESSURE_WAIT_S = 1.0  # a full model deployment: the job waits its turn in such steps


class JobCancelled(Exception):
    """The job was deleted while it ran."""


@dataclasses.dataclass
class Running:
    stream: SyncModelStream | None = None
    progress: float = 0.0
    cancelled: bool = False
    deadline: float | None = None  # monotonic; set when the model accepts the job
    timed_out: bool = False


def waiting_client(handle: Any) -> ModelClient:
    """The consumer's model client: a full model deployment is waited out, not failed."""
    return RayModelClient(handle, wait_s=BACKPRESSURE_WAIT_S)


class ImageJobConsumer:
    """Runs queued jobs; `app.build_app` wraps it with `task_consumer(...)`."""

    _adapter: Any  # the Celery adapter, set by Ray Serve's `task_consumer` wrapper

    @staticmethod
    def deployment_options(args: AppArgs) -> dict[str, Any]:
        """Options for `serve.deployment`; a serve config's `deployments:` may override them.
        `args.jobs` is what the autoscaling policy gets: no password, only where to read it."""
        return {
            "name": "ImageJobConsumer",
            "ray_actor_options": {"num_cpus": 0},  # it forwards jobs; the model replicas compute
            "max_ongoing_requests": 16,  # jobs in flight per consumer: enough to fill batches
            # Running jobs finish (`jobs.drain_s`) before a replica goes:
            "graceful_shutdown_timeout_s": args.jobs.graceful_shutdown_s,
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

    def __init__(
        self,
        args: dict,
        model_handles: dict,
        embedded_redis: Any = None,
        client_factory: Callable[[Any], ModelClient] = waiting_client,
    ) -> None:
        """`embedded_redis`: the embedded Redis deployment, bound here so the app deploys it.
        `client_factory` makes each model handle a `ModelClient` (unit tests pass fakes)."""
        self.args = AppArgs.model_validate(args)
        self.config = self.args.jobs
        backend = JobBackend.from_args(self.args)
        self.store = backend.store
        self.images = backend.images
        self.metrics = backend.metrics
        self.webhooks = backend.webhooks
        self.models = {model_id: client_factory(h) for model_id, h in model_handles.items()}
        self.worker = _replica_id()
        self.timeout_s = self.config.timeout_s or self.args.limits.request_timeout_s
        self._running: dict[str, Running] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._heartbeats, name="job-heartbeat", daemon=True).start()

    @task_handler(name=TASK_NAME)
    def run_image_job(self, job_id: str) -> str:
        state = with_redis(lambda: self.store.start(job_id, self.worker))
        if state == "busy":
            # A second delivery (the first outlived the visibility timeout) while a consumer
            # still runs the job: look again later, so the job is not lost if that one dies.
            countdown = 2 * self.config.stale_s
            self._adapter.enqueue_task_sync(TASK_NAME, args=[job_id], countdown=countdown)
        if state != "started":
            logger.info("job %s not run: %s", job_id, state)
            return state
        record = with_redis(lambda: self.store.get(job_id))
        if record is None:  # deleted between start and now
            return "cancelled"
        self.metrics.started(time.time() - record.created_at)
        started = time.monotonic()
        with self._lock:
            self._running[job_id] = running = Running()
        try:
            outcome = self._run(record, running)
        except Exception as exc:
            if running.cancelled:
                outcome = "cancelled"
            elif replica_lost(exc):
                return self._retry_or_fail(job_id, exc)
            else:  # a bug: fail loudly, once, with its traceback in the log
                logger.error("job %s failed with an internal error", job_id, exc_info=exc)
                error = APIError(
                    "The server had an error while processing the job.",
                    status=500,
                    code="internal_error",
                )
                outcome = self._fail(job_id, error)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
            self.metrics.running_s.observe(time.monotonic() - started)
        self.metrics.finished(outcome)
        self._send_webhook(job_id)
        logger.info("job %s %s", job_id, outcome)
        return outcome

    def _run(self, record: JobRecord, running: Running) -> str:
        """Run one started job to its outcome: completed, failed (its own error) or cancelled."""
        try:
            data = self.store.payload(record.id)
            if data is None:
                raise APIError("The job's request was lost.", status=500, code="internal_error")
            request = dataclasses.replace(ModelRequest.from_json(data), report_progress=True)
            result = self._generate(self.models[record.model], request, running)
            return self._complete(record, result)
        except JobCancelled:
            return "cancelled"
        except Exception as exc:
            error = api_error(exc)
            if error is None:
                raise
            return self._fail(record.id, error)

    def _generate(
        self, client: ModelClient, request: ModelRequest, running: Running
    ) -> GenerationResult:
        running.stream = stream = client.stream_sync(request)
        if running.cancelled:  # deleted before the stream existed
            stream.cancel()
        result = None
        try:
            for event in stream:
                if isinstance(event, Accepted) and running.deadline is None:
                    running.deadline = time.monotonic() + self.timeout_s  # heartbeats watch
                elif isinstance(event, Progress):
                    running.progress = event.fraction
                elif isinstance(event, Completed):
                    result = event.result
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

    def _complete(self, record: JobRecord, result: GenerationResult) -> str:
        resolved = record.resolved
        if resolved is None:
            raise APIError("The job's request was lost.", status=500, code="internal_error")
        names = [self.images.put(image, resolved.output_format) for image in result.images]
        usage = build_usage(resolved, result.text_tokens, record.input_tokens)
        status = with_redis(
            lambda: self.store.finish(
                record.id,
                JobStatus.COMPLETED,
                images=tuple(names),
                usage=usage,
                created=int(time.time()),
                progress=1.0,
                batch_sizes=tuple(result.batch_sizes),
            )
        )
        if status != "ok":  # deleted while its images were saved
            for name in names:
                self.images.delete(name)
            return "cancelled"
        return "completed"

    def _fail(self, job_id: str, error: APIError) -> str:
        body = JobError(message=error.message, type=error.type, code=error.code, param=error.param)
        status = with_redis(lambda: self.store.finish(job_id, JobStatus.FAILED, error=body))
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
            with_redis(lambda: self.store.requeue(job_id, type(exc).__name__))
            self.metrics.retries.inc()
        raise exc

    def _send_webhook(self, job_id: str) -> None:
        record = self.store.get(job_id)
        if record is None or not record.webhook_url:
            return
        body = job_object(record, self.images, base_url=record.base_url)
        event = f"{job_id}_{record.status.value}"
        self.webhooks.send(record.webhook_url, event, body.model_dump_json().encode())

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
        while not self._stopped.wait(self.config.heartbeat_s / 2):
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
        deadline = time.monotonic() + self.config.drain_s
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


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve
        return "local"
