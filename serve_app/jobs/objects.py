"""A `JobRecord` as the wire's job object, with its result rebuilt exactly as the synchronous call
would have answered (images from the job store: base64, or fresh links). Also what a webhook
carries, so no Starlette here (`serve_app.shapes` shapes the result)."""

from __future__ import annotations

from serve_app.codec import to_base64
from serve_app.jobs.record import JobRecord, JobStatus
from serve_app.protocol import ErrorInfo, ImageJobObject, ImagesResponse
from serve_app.shapes import images_response
from serve_app.storage import ImageStore


def job_object(
    record: JobRecord, images: ImageStore, base_url: str, with_result: bool = True
) -> ImageJobObject:
    status = record.status
    result = error = None
    if status == JobStatus.COMPLETED and record.images and with_result:
        result = _result(record, images, base_url)
    if status == JobStatus.FAILED and record.error is not None:
        error = ErrorInfo(**vars(record.error))
    return ImageJobObject(
        id=record.id,
        status=status.value,
        created_at=int(record.created_at),
        model=record.model,
        endpoint=record.endpoint,
        queue_position=record.queue_position if status == JobStatus.QUEUED else None,
        progress=record.progress,
        started_at=_int(record.started_at),
        completed_at=_int(record.completed_at),
        attempts=record.attempts,
        result=result,
        error=error,
    )


def _result(record: JobRecord, images: ImageStore, base_url: str) -> ImagesResponse:
    resolved, usage = record.resolved, record.usage
    if resolved is None or usage is None:
        raise ValueError(f"job {record.id} is completed but has no request or usage")
    if resolved.response_format == "url":
        expires = int(record.completed_at or 0) + record.ttl_s
        links = [images.link(name, base_url, expires) for name in record.images]
        result = images_response(resolved, usage, urls=links)
    else:
        result = images_response(resolved, usage, [to_base64(images.get(n)) for n in record.images])
    if record.created is not None:
        result.created = record.created
    return result


def _int(value: float | None) -> int | None:
    return int(value) if value else None
