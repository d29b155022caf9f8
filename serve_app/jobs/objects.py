"""A job record (Redis hash) as the wire's job object, with its result rebuilt exactly as the
synchronous call would have answered (images from the job store: base64, or fresh links)."""

from __future__ import annotations

import json

from serve_app.codec import to_base64
from serve_app.http.responses import images_response
from serve_app.jobs.payload import resolved_from_json
from serve_app.protocol import ErrorInfo, ImageJobObject, Usage
from serve_app.storage import ImageStore


def _int(value: str | None) -> int | None:
    return int(float(value)) if value else None


def job_object(
    record: dict[str, str], images: ImageStore, base_url: str, with_result: bool = True
) -> ImageJobObject:
    status = record["status"]
    result = error = None
    if status == "completed" and record.get("images") and with_result:
        resolved = resolved_from_json(record["resolved"])
        names = json.loads(record["images"])
        usage = Usage.model_validate_json(record["usage"])
        if resolved.response_format == "url":
            expires = int(float(record["completed_at"])) + int(record["ttl_s"])
            links = [images.link(name, base_url, expires) for name in names]
            result = images_response(resolved, usage, urls=links)
        else:
            result = images_response(resolved, usage, [to_base64(images.get(n)) for n in names])
        result.created = int(record["created"])
    if status == "failed" and record.get("error"):
        error = ErrorInfo.model_validate_json(record["error"])
    position = record.get("queue_position")
    return ImageJobObject(
        id=record["id"],
        status=status,
        created_at=int(float(record["created_at"])),
        model=record["model"],
        endpoint=record["endpoint"],
        queue_position=int(position) if status == "queued" and position else None,
        progress=float(record.get("progress") or 0),
        started_at=_int(record.get("started_at")),
        completed_at=_int(record.get("completed_at")),
        attempts=int(record.get("attempts") or 0),
        result=result,
        error=error,
    )
