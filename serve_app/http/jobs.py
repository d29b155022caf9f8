"""Asynchronous jobs over HTTP: `Prefer: respond-async` submissions and `/v1/images/jobs`.

A submission has been read, validated and resolved exactly like a synchronous request (so a bad
one gets the same 4xx and no job); here it is recorded in Redis and enqueued for Ray Serve's task
consumer (`serve_app.jobs.consumer`), and answered `202 Accepted` with the job object and its
`Location`. With API keys on, a job belongs to the key that created it: other keys get 404.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.config import AppArgs
from serve_app.contract import APIError, ImageJob
from serve_app.http.responses import signed_file
from serve_app.jobs import payload
from serve_app.jobs.metrics import JobMetrics
from serve_app.jobs.objects import job_object
from serve_app.jobs.queue import TASK_NAME, redis_url, task_processor_config
from serve_app.jobs.store import FINISHED, JobStore, QueueFull, new_job_id
from serve_app.jobs.webhooks import WebhookSender, check_webhook_url
from serve_app.protocol import ImageJobList
from serve_app.resolution import ResolvedGeneration
from serve_app.storage import make_job_store, url_secret

logger = logging.getLogger("ray.serve")

JOBS_ROUTE = "/v1/images/jobs"


class _NoRedis:
    """The job store when no Redis is configured: every use says what to set."""

    def __init__(self, env: str) -> None:
        self.env = env

    def __getattr__(self, name: str):
        def unavailable(*args, **kwargs):
            raise ConnectionError(f"no Redis is configured for jobs: set ${self.env}")

        return unavailable


def wants_async(request: Request) -> bool:
    """RFC 7240: `Prefer: respond-async` among the request's preferences."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            if preference.split(";")[0].strip().lower() == "respond-async":
                return True
    return False


class JobRoutes:
    def __init__(self, args: AppArgs) -> None:
        self.config = args.jobs
        self.url = redis_url(self.config)
        self.store = (
            JobStore(self.url, self.config.result_ttl_s, self.config.max_queued)
            if self.url
            else _NoRedis(self.config.redis_url_env)
        )
        self.images = make_job_store(
            args.storage, self.config.result_ttl_s, url_secret(args.storage)
        )
        self.public_base_url = args.storage.public_base_url
        self.metrics = JobMetrics()
        self.webhooks = WebhookSender(self.config.webhooks, self.metrics.webhook_outcome)
        self._producer = None

    # --- submission ----------------------------------------------------------------------------
    async def submit(
        self,
        request: Request,
        endpoint: str,
        resolved: ResolvedGeneration,
        job: ImageJob,
        input_tokens: int,
        webhook_url: str | None,
    ) -> Response:
        if resolved.stream:
            raise APIError(
                "An asynchronous job cannot stream: drop stream, or Prefer: respond-async.",
                param="stream",
                code="unsupported_value",
            )
        if webhook_url:
            await asyncio.to_thread(check_webhook_url, webhook_url, self.config.webhooks)
        job_id = new_job_id()
        now = time.time()
        fields = {
            "id": job_id,
            "status": "queued",
            "model": resolved.model_id,
            "endpoint": f"{endpoint}s",
            "owner": request.state.key_name,
            "created_at": now,
            "request_id": request.state.request_id,
            "resolved": payload.resolved_to_json(resolved),
            "input_tokens": input_tokens,
            "base_url": self.public_base_url or str(request.base_url),
            "ttl_s": self.config.result_ttl_s,
            "attempts": 0,
            "progress": 0,
            **({"webhook_url": webhook_url} if webhook_url else {}),
        }
        data = await asyncio.to_thread(payload.job_to_bytes, job)
        try:
            position = await asyncio.to_thread(self.store.submit, job_id, fields, data)
        except QueueFull:
            raise APIError(
                f"The job queue is full ({self.config.max_queued} jobs wait); retry later.",
                status=429,
                code="queue_full",
                headers={"Retry-After": "30"},
            ) from None
        except Exception as exc:  # noqa: BLE001 - Redis unreachable
            raise self._unavailable(exc) from None
        try:
            await asyncio.to_thread(self._enqueue, job_id)
        except Exception as exc:  # noqa: BLE001 - the broker went away in between
            await asyncio.to_thread(self.store.forget, job_id, fields["owner"])
            raise self._unavailable(exc) from None
        self.metrics.jobs.inc(tags={"status": "submitted"})
        request.state.summary["job"] = job_id
        record = {**{k: str(v) for k, v in fields.items()}, "queue_position": str(position)}
        body = job_object(record, self.images, "").model_dump(mode="json")
        headers = {"Location": f"{JOBS_ROUTE}/{job_id}", "Preference-Applied": "respond-async"}
        return JSONResponse(body, status_code=202, headers=headers)

    def _enqueue(self, job_id: str) -> None:
        if self._producer is None:
            from ray.serve.task_consumer import instantiate_adapter_from_config

            config = task_processor_config(self.config, self.url)
            self._producer = instantiate_adapter_from_config(config)
        self._producer.enqueue_task_sync(TASK_NAME, args=[job_id])

    def _unavailable(self, exc: Exception) -> APIError:
        logger.warning("job submission failed: Redis unavailable: %s", exc)
        embedded = (self.url or "").endswith(f"@127.0.0.1:{self.config.embedded_port}/0")
        hint = (
            " The embedded Redis needs a redis-server binary (apt-get install redis-server)."
            if embedded
            else ""
        )
        reason = (
            f"no Redis is configured (set ${self.config.redis_url_env} on every node)"
            if self.url is None
            else f"their Redis cannot be reached ({type(exc).__name__})"
        )
        return APIError(
            f"Asynchronous jobs are unavailable: {reason}.{hint} Synchronous requests still "
            "work; retry later.",
            status=503,
            code="jobs_unavailable",
            headers={"Retry-After": "10"},
        )

    # --- routes ----------------------------------------------------------------------------------
    async def _owned(self, request: Request) -> dict[str, str]:
        job_id = request.path_params["job_id"]
        try:
            record = await asyncio.to_thread(self.store.get, job_id)
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(exc) from None
        if record is None or record.get("owner") != request.state.key_name:
            raise APIError(
                f"No job {job_id[:80]!r}.", status=404, param="job_id", code="job_not_found"
            )
        return record

    def _base_url(self, request: Request) -> str:
        return self.public_base_url or str(request.base_url)

    async def job(self, request: Request) -> Response:
        """`GET` or `DELETE /v1/images/jobs/{job_id}` (one route: one `Allow` header)."""
        if request.method == "DELETE":
            return await self.delete_job(request)
        return await self.get_job(request)

    async def get_job(self, request: Request) -> Response:
        record = await self._owned(request)
        body = await asyncio.to_thread(job_object, record, self.images, self._base_url(request))
        return Response(body.model_dump_json(), media_type="application/json")

    async def delete_job(self, request: Request) -> Response:
        """Cancel a queued or running job; delete a finished one with its images."""
        record = await self._owned(request)
        job_id = record["id"]
        if record["status"] in FINISHED:
            await asyncio.to_thread(self._delete_finished, record)
            self.metrics.jobs.inc(tags={"status": "deleted"})
            return JSONResponse({"id": job_id, "object": "image.job.deleted", "deleted": True})
        before = await asyncio.to_thread(self.store.cancel, job_id)
        if before in ("queued", "in_progress"):
            self.metrics.jobs.inc(tags={"status": "cancelled"})
        record = await asyncio.to_thread(self.store.get, job_id) or record
        body = job_object(record, self.images, self._base_url(request))
        if before == "queued" and record.get("webhook_url"):  # no consumer will see it
            message = body.model_dump_json().encode()
            self.webhooks.send(record["webhook_url"], f"{job_id}_cancelled", message)
        return Response(body.model_dump_json(), media_type="application/json")

    def _delete_finished(self, record: dict[str, str]) -> None:
        import json

        for name in json.loads(record.get("images") or "[]"):
            self.images.delete(name)
        self.store.forget(record["id"], record["owner"])

    async def list_jobs(self, request: Request) -> Response:
        query = request.query_params
        limit_text = query.get("limit", "20")
        if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
            raise APIError("limit must be an integer from 1 to 100.", param="limit")
        after = query.get("after") or None
        try:
            records, more = await asyncio.to_thread(
                self.store.list, request.state.key_name, int(limit_text), after
            )
        except KeyError:
            raise APIError(
                f"after={after[:80]!r} names no job of yours (it may have expired or been "
                "deleted); list from the start.",
                param="after",
            ) from None
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(exc) from None
        base_url = self._base_url(request)  # (listings carry no results: GET a job for it)
        jobs = [job_object(r, self.images, base_url, with_result=False) for r in records]
        listing = ImageJobList(
            data=jobs,
            first_id=jobs[0].id if jobs else None,
            last_id=jobs[-1].id if jobs else None,
            has_more=more,
        )
        return Response(listing.model_dump_json(), media_type="application/json")

    async def get_file(self, request: Request) -> Response:
        """A job's `url` image behind its signed link (local storage)."""
        return await signed_file(self.images, request)

    def cleanup(self) -> int:
        return self.images.cleanup()
