"""Asynchronous jobs over HTTP: `Prefer: respond-async` submissions and `/v1/images/jobs`.

A submission has been read, validated and resolved exactly like a synchronous request (so a bad
one gets the same 4xx and no job); here it is recorded in Redis and enqueued for Ray Serve's task
consumer (`serve_app.jobs.consumer`), and answered `202 Accepted` with the job object and its
`Location`. With API keys on, a job belongs to the key that created it: other keys get 404.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
import threading
import time
from typing import Any

import redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.config import AppArgs
from serve_app.contract import APIError, ModelRequest
from serve_app.http.responses import signed_file
from serve_app.jobs.backend import JobBackend
from serve_app.jobs.objects import job_object
from serve_app.jobs.queue import TASK_NAME, task_processor_config, uses_embedded
from serve_app.jobs.record import JobRecord, JobStatus
from serve_app.jobs.store import QueueFull, new_job_id
from serve_app.jobs.webhooks import check_webhook_url
from serve_app.protocol import ImageJobList, shown
from serve_app.resolution import ResolvedGeneration
from serve_app.routes import JOBS_ROUTE

logger = logging.getLogger("ray.serve")

JOB_ID = re.compile(r"imgjob_[0-9a-f]{24}")  # the shape `store.new_job_id` makes


# What "Redis cannot be reached or refuses us" raises (OSError includes timeouts); anything else
# is a bug: it propagates, and the request frame logs it and answers an opaque 500.
REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, ConnectionError, OSError)


def wants_async(request: Request) -> bool:
    """RFC 7240: `Prefer: respond-async` among the request's preferences."""
    for header in request.headers.getlist("prefer"):
        for preference in header.split(","):
            if preference.split(";")[0].strip().lower() == "respond-async":
                return True
    return False


class JobRoutes:
    def __init__(self, args: AppArgs, backend: JobBackend | None = None) -> None:
        self.backend = backend or JobBackend.from_args(args)
        self.config = self.backend.config
        self.url = self.backend.url
        self.store = self.backend.store
        self.images = self.backend.images
        self.metrics = self.backend.metrics
        self.webhooks = self.backend.webhooks
        self.public_base_url = self.backend.public_base_url
        self._producer: Any = None
        self._producer_lock = threading.Lock()  # submissions enqueue on worker threads

    # --- submission ----------------------------------------------------------------------------
    async def submit(
        self,
        request: Request,
        endpoint: str,
        resolved: ResolvedGeneration,
        model_request: ModelRequest,
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
        record = JobRecord(
            id=new_job_id(),
            status=JobStatus.QUEUED,
            model=resolved.model_id,
            endpoint=f"{endpoint}s",
            owner=request.state.key_name,
            created_at=time.time(),
            request_id=request.state.request_id,
            resolved=resolved,
            input_tokens=input_tokens,
            base_url=self._base_url(request),
            ttl_s=self.config.result_ttl_s,
            webhook_url=webhook_url or None,
        )
        data = await asyncio.to_thread(model_request.to_json)
        try:
            position = await asyncio.to_thread(self.store.submit, record, data)
        except QueueFull as full:
            whose = "of this API key " if full.per_key else ""
            raise APIError(
                f"The job queue is full ({full.limit} jobs {whose}wait for the model); retry "
                "later.",
                status=429,
                code="queue_full",
                headers={"Retry-After": "30"},
            ) from None
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from None
        try:
            await asyncio.to_thread(self._enqueue, record.id)
        except Exception as exc:  # noqa: BLE001 - the broker (kombu) went away in between
            await asyncio.to_thread(self.store.forget, record.id, record.owner)
            raise self._unavailable(exc) from None
        self.metrics.jobs.inc(tags={"status": "submitted"})
        request.state.summary["job"] = record.id
        queued = dataclasses.replace(record, queue_position=position)
        body = job_object(queued, self.images, "").model_dump(mode="json")
        headers = {"Location": f"{JOBS_ROUTE}/{record.id}", "Preference-Applied": "respond-async"}
        return JSONResponse(body, status_code=202, headers=headers)

    def _enqueue(self, job_id: str) -> None:
        with self._producer_lock:  # one producer, made once, however many threads submit
            if self._producer is None:
                from ray.serve.task_consumer import instantiate_adapter_from_config

                assert self.url is not None  # a job was stored: Redis is configured
                config = task_processor_config(self.config, self.url)
                self._producer = instantiate_adapter_from_config(config)
        self._producer.enqueue_task_sync(TASK_NAME, args=[job_id])

    def _unavailable(self, exc: BaseException) -> APIError:
        """A 503 for a Redis or broker that cannot be used now; the log keeps the traceback."""
        reason = self.unavailable_reason(exc)
        logger.warning("jobs unavailable: %s", reason, exc_info=exc)
        return APIError(
            f"Asynchronous jobs are unavailable: {reason}. Synchronous "
            "requests still work; retry later.",
            status=503,
            code="jobs_unavailable",
            headers={"Retry-After": "10"},
        )

    def unavailable_reason(self, exc: BaseException) -> str:
        """What stops jobs, as precisely as the error allows (`/health` and 503s say it)."""
        if self.url is None:
            return f"no Redis is configured (set ${self.config.redis_url_env} on every node)"
        where = "the embedded Redis" if uses_embedded(self.config) else "their Redis"
        if isinstance(exc, redis.AuthenticationError | redis.ResponseError):
            port = f" on port {self.config.embedded_port}" if uses_embedded(self.config) else ""
            return (
                f"{where}{port} refuses this app's password (another Redis server holds the "
                "port? stop it, or set jobs.embedded_port to a free port)"
            )
        if uses_embedded(self.config) and shutil.which("redis-server") is None:
            return f"{where} needs a redis-server binary (apt-get install redis-server)"
        return f"{where} cannot be reached ({type(exc).__name__})"

    async def health(self) -> str | None:
        """None when jobs can be submitted now; else why not."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self.store.ping), 3)
        except REDIS_ERRORS as exc:  # (timeouts are OSErrors)
            return self.unavailable_reason(exc)
        return None

    # --- routes ----------------------------------------------------------------------------------
    async def _owned(self, request: Request) -> JobRecord:
        job_id = request.path_params["job_id"]
        not_found = APIError(
            f"No job {shown(job_id)}.", status=404, param="job_id", code="job_not_found"
        )
        if not JOB_ID.fullmatch(job_id):  # no id we made: Redis is not asked (nor its keys)
            raise not_found
        try:
            record = await asyncio.to_thread(self.store.get, job_id)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from None
        if record is None or record.owner != request.state.key_name:
            raise not_found
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
        """Cancel a queued or running job; delete a finished one with its images. The store's
        cancel script decides and reads the job in one step, so each of concurrent deletes
        answers a state the job really had after it: cancelled, or deleted."""
        job_id = (await self._owned(request)).id
        try:
            before, record = await asyncio.to_thread(self.store.cancel_and_get, job_id)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from None
        if record is None or JobStatus(before).finished:  # deleted meanwhile, or final
            if record is not None:
                await asyncio.to_thread(self._delete_finished, record)
                self.metrics.jobs.inc(tags={"status": "deleted"})
            return JSONResponse({"id": job_id, "object": "image.job.deleted", "deleted": True})
        self.metrics.jobs.inc(tags={"status": "cancelled"})
        body = job_object(record, self.images, self._base_url(request))
        if before == JobStatus.QUEUED and record.webhook_url:  # no consumer will see it
            message = body.model_dump_json().encode()
            self.webhooks.send(record.webhook_url, f"{job_id}_cancelled", message)
        return Response(body.model_dump_json(), media_type="application/json")

    def _delete_finished(self, record: JobRecord) -> None:
        for name in record.images:
            self.images.delete(name)
        self.store.forget(record.id, record.owner)

    async def list_jobs(self, request: Request) -> Response:
        query = request.query_params
        limit_text = query.get("limit", "20")
        if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
            raise APIError("limit must be an integer from 1 to 100.", param="limit")
        after = query.get("after") or None
        try:
            records, more = await asyncio.to_thread(
                self.store.list_owned, request.state.key_name, int(limit_text), after
            )
        except KeyError:
            raise APIError(
                f"after={(after or '')[:80]!r} names no job of yours (it may have expired or "
                "been deleted); list from the start.",
                param="after",
            ) from None
        except REDIS_ERRORS as exc:
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
