"""Body readers: JSON, multipart and `data:` URLs, with explicit limits, into wire models and
decoded images. Every problem is an `APIError` naming the field; nothing the client sent is
dropped silently (unknown file fields and repeated fields are refused).

Bodies are read under a `BodyGuard`: Ray Serve hands a request to the ingress replica as soon as
its headers arrive, and the replica holds one of its `max_ongoing_requests` slots while the body
streams in from the proxy. So a body must arrive within `limits.body_timeout_s` (408), and one
client address may have at most `limits.max_uploads_per_client` slow bodies arriving at once
(429): trickled uploads cannot hold every slot, and `/health` stays answerable.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message, Receive

from serve_app.codec import decode_data_url
from serve_app.config import UploadLimits
from serve_app.contract import APIError
from serve_app.protocol import (
    SHOWN_CHARS,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageURL,
    ImageVariationRequest,
    RequestModel,
    shown,
)
from serve_app.uploads import UploadError

Model = TypeVar("Model", bound=RequestModel)
Upload = tuple[str, bytes]  # (the field it came in, its bytes)


@dataclass
class ImageUploads:
    """The input images of an edit or variation, still encoded, each with the field it came in."""

    images: list[Upload] = field(default_factory=list)
    mask: Upload | None = None


SLOW_BODY_S = 1.0  # a body still arriving after this long counts as an upload in progress


class UploadSlots:
    """Slow bodies arriving now, per client address, in this process (one event loop)."""

    def __init__(self) -> None:
        self.active: collections.Counter[str] = collections.Counter()

    def take(self, client: str, limit: int) -> bool:
        if self.active[client] >= limit:
            return False
        self.active[client] += 1
        return True

    def give_back(self, client: str) -> None:
        self.active[client] -= 1
        if self.active[client] <= 0:
            del self.active[client]


UPLOADS = UploadSlots()


class BodyGuard:
    """A request's ASGI `receive` while its body is read: the body must be in by `deadline`
    (408), and a body still arriving after `SLOW_BODY_S` takes one of its client's upload slots
    (429 when none is free). Once the body is in, messages pass straight through."""

    def __init__(
        self, receive: Receive, client: str, limits: UploadLimits, slots: UploadSlots = UPLOADS
    ) -> None:
        started = time.monotonic()
        self.receive, self.client, self.limits, self.slots = receive, client, limits, slots
        self.deadline = started + min(limits.body_timeout_s, limits.request_timeout_s)
        self.slow_at = started + SLOW_BODY_S
        self.holds_slot = False
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        pending = asyncio.ensure_future(self.receive())
        try:
            while not pending.done():
                now = time.monotonic()
                if now >= self.deadline:
                    raise self._timed_out()
                if not self.holds_slot and now >= self.slow_at:
                    self._take_slot()
                wake = self.deadline if self.holds_slot else min(self.deadline, self.slow_at)
                await asyncio.wait({pending}, timeout=wake - now)
        except BaseException:
            pending.cancel()
            raise
        message = pending.result()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.finish()
        return message

    def _take_slot(self) -> None:
        if not self.slots.take(self.client, self.limits.max_uploads_per_client):
            raise APIError(
                f"Too many uploads in progress from your address: at most "
                f"{self.limits.max_uploads_per_client} request bodies may be arriving at once. "
                "Retry when one has finished.",
                status=429,
                code="too_many_uploads",
                headers={"Retry-After": "2", "Connection": "close"},
            )
        self.holds_slot = True

    def _timed_out(self) -> APIError:
        seconds = min(self.limits.body_timeout_s, self.limits.request_timeout_s)
        return APIError(
            f"The request body did not arrive within {seconds:g} seconds; the server stopped "
            "waiting for it.",
            status=408,
            code="body_timeout",
            headers={"Connection": "close"},
        )

    def finish(self) -> None:
        """The body is in (or will never be): give the upload slot back, pass messages on."""
        self.done = True
        if self.holds_slot:
            self.holds_slot = False
            self.slots.give_back(self.client)


@asynccontextmanager
async def guarded_body(request: Request, limits: UploadLimits) -> AsyncIterator[None]:
    """Read the request's body (in the `with` block) under a `BodyGuard`."""
    client = request.client.host if request.client else "-"
    guard = BodyGuard(request._receive, client, limits)
    request._receive = guard  # what `Request.stream()` and `Request.form()` read from
    try:
        yield
    finally:
        guard.finish()


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def check_body_size(request: Request, limit: int) -> None:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(
            f"The request body is {length} bytes; the limit is {limit} bytes.",
            status=413,
            code="request_too_large",
        )


def parse_model(model_cls: type[Model], data: Any, *, form: bool = False) -> Model:
    """Validate a decoded body (`form`: multipart text fields); the first problem becomes a 400
    naming its field."""
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(data, context={"form": form})
    except ValidationError as exc:
        raise validation_error_to_api_error(exc) from None


def validation_error_to_api_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        value = first.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        message = f"Invalid value for '{param}': {first['msg']} (got {shown[:100]})."
    return APIError(message, param=param)


async def read_body(request: Request, limit: int, limits: UploadLimits) -> bytes:
    """The body, refusing (413) more than `limit` bytes even without a Content-Length, under
    `limits`' body deadline and upload slots."""
    check_body_size(request, limit)
    chunks, size = [], 0
    async with guarded_body(request, limits):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    f"The request body exceeds the limit of {limit} bytes.",
                    status=413,
                    code="request_too_large",
                )
            chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int, limits: UploadLimits) -> object:
    body = await read_body(request, limit, limits)
    if not body:
        raise APIError("The request body is empty; send a JSON object.")
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError("The request body is not valid JSON: it is nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integer digit limits
        raise APIError(f"The request body is not valid JSON: {exc}.") from None


async def read_multipart(
    request: Request, limits: UploadLimits, file_fields: tuple[str, ...]
) -> tuple[dict[str, str], list[Upload]]:
    """Scalar fields and (field name, bytes) uploads, in order, with explicit limits.

    File fields other than `file_fields` are refused: nothing the client sent is dropped silently.
    """
    if "content-length" not in request.headers:
        raise APIError(
            "multipart uploads need a Content-Length header.", status=411, code="length_required"
        )
    try:
        async with guarded_body(request, limits):
            form = await request.form(
                max_files=limits.max_input_images + 1, max_fields=64, max_part_size=1024 * 1024
            )
    except (MultiPartException, HTTPException) as exc:
        message = str(getattr(exc, "message", None) or getattr(exc, "detail", exc))
        if "Too many files" in message:
            raise APIError(
                f"Too many files: at most {limits.max_input_images} images (and one mask).",
                param=file_fields[0],
            ) from None
        raise APIError(f"Invalid multipart/form-data body: {message}") from None
    fields: dict[str, Any] = {}
    files: list[Upload] = []
    lists: dict[str, list[str]] = {key: [] for key in LORA_FORM_FIELDS}
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((key, await _read_file(key, value, file_fields, limits)))
            elif key in lists:
                lists[key].append(value)
            elif key in fields:
                raise APIError(
                    f"Parameter {shown(key)} was sent more than once.", param=key[:SHOWN_CHARS]
                )
            else:
                fields[key] = value
    finally:
        await form.close()
    if any(lists.values()):
        fields["lora"] = _lora_from_brackets(fields, *lists.values())
    return fields, files


# How the openai SDKs send a list of objects in a multipart form (`lora=[{...}]` in extra_body).
LORA_FORM_FIELDS = ("lora[][name]", "lora[][scale]")


def _lora_from_brackets(fields: dict[str, Any], names: list[str], scales: list[str]) -> list:
    """`lora[][name]` / `lora[][scale]` fields, paired in order, as the `lora` list."""
    if "lora" in fields:
        raise APIError("Send 'lora' once: as JSON text or as lora[][name] fields.", param="lora")
    if scales and len(scales) != len(names):
        raise APIError(
            f"{len(names)} lora[][name] fields but {len(scales)} lora[][scale] fields: give "
            "every adapter a scale (or none), or send 'lora' as JSON text.",
            param="lora",
        )
    return [
        {"name": name, **({"scale": scales[i]} if scales else {})} for i, name in enumerate(names)
    ]


async def _read_file(
    key: str, upload: UploadFile, file_fields: tuple[str, ...], limits: UploadLimits
) -> bytes:
    if key not in file_fields:
        raise APIError(
            f"Unexpected file field {shown(key)}; this endpoint takes "
            f"{', '.join(repr(f) for f in file_fields)}.",
            param=key[:SHOWN_CHARS],
        )
    if upload.size is not None and upload.size > limits.max_image_bytes:
        raise APIError(
            f"The file in {key!r} is {upload.size} bytes; the limit is "
            f"{limits.max_image_bytes} bytes.",
            status=413,
            param=key,
            code="file_too_large",
        )
    return await upload.read()


def _refuse_fields(data: Any, names: tuple[str, ...], why: str) -> None:
    """Fields another endpoint takes are refused here, not silently ignored."""
    if isinstance(data, dict):
        for name in names:
            if name in data:
                raise APIError(f"Unexpected parameter {name!r}: {why}.", param=name)


def _unsupported_media(message: str) -> APIError:
    return APIError(message, status=415, code="unsupported_media_type")


async def read_generation(request: Request, limits: UploadLimits) -> ImageGenerationRequest:
    """`POST /v1/images/generations`: a JSON body."""
    check_body_size(request, limits.max_request_bytes)
    data = await read_json(request, limits.max_json_bytes, limits)
    _refuse_fields(
        data,
        ("image", "images", "mask"),
        "generations take no input images; send them to /v1/images/edits",
    )
    return parse_model(ImageGenerationRequest, data)


async def read_edit(
    request: Request, limits: UploadLimits
) -> tuple[ImageEditRequest, ImageUploads]:
    """`POST /v1/images/edits`: multipart (`image` / `image[]`, `mask`) or JSON (`data:` URLs)."""
    check_body_size(request, limits.max_request_bytes)
    kind = content_type(request)
    if kind == "multipart/form-data":
        fields, files = await read_multipart(request, limits, ("image", "image[]", "mask"))
        parsed = parse_model(ImageEditRequest, fields, form=True)
        images = [(name, data) for name, data in files if name != "mask"]
        masks = [(name, data) for name, data in files if name == "mask"]
    elif kind == "application/json":
        parsed = parse_model(
            ImageEditRequest, await read_json(request, limits.max_request_bytes, limits)
        )
        images = [_data_url(ref, f"images[{i}]") for i, ref in enumerate(parsed.images or [])]
        masks = [_data_url(parsed.mask, "mask")] if parsed.mask else []
    else:
        raise _unsupported_media(
            "Send edits as multipart/form-data (image files) or application/json (data: URLs)."
        )
    if len(masks) > 1:
        raise APIError("Send at most one mask.", param="mask")
    return parsed, ImageUploads(images, masks[0] if masks else None)


async def read_variation(
    request: Request, limits: UploadLimits
) -> tuple[ImageVariationRequest, ImageUploads]:
    """`POST /v1/images/variations`: multipart with exactly one `image`."""
    check_body_size(request, limits.max_request_bytes)
    if content_type(request) != "multipart/form-data":
        raise _unsupported_media("Send variations as multipart/form-data with one 'image' file.")
    fields, files = await read_multipart(request, limits, ("image",))
    _refuse_fields(
        fields,
        ("prompt",),
        "variations take no prompt (the instruction is the "
        "model's configured variation prompt); use /v1/images/edits to give one",
    )
    parsed = parse_model(ImageVariationRequest, fields, form=True)
    if len(files) > 1:
        raise APIError("Variations take exactly one 'image'.", param="image")
    return parsed, ImageUploads(files)


def _data_url(ref: ImageURL, param: str) -> Upload:
    if ref.image_url is None:
        raise APIError(
            "Only image_url with a data: URL is supported (file_id is not).",
            param=f"{param}.image_url",
        )
    try:
        return f"{param}.image_url", decode_data_url(ref.image_url)
    except UploadError as exc:
        raise APIError(f"Invalid {param}.image_url: {exc}.", param=f"{param}.image_url") from None
