"""Shape model results into OpenAI's answers: the images response and the stream's events."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import Response

from serve_app.protocol import (
    AdapterUsed,
    CompletedImageEvent,
    ErrorResponse,
    ImageData,
    ImagesResponse,
    PartialImageEvent,
    Usage,
)
from serve_app.resolution import ResolvedGeneration
from serve_app.storage import ImageStore

# The stream's event-type prefix per endpoint (OpenAI streams generations and edits).
STREAM_PREFIX = {"generation": "image_generation", "edit": "image_edit"}


def adapters_used(resolved: ResolvedGeneration) -> list[AdapterUsed] | None:
    """The LoRA adapters each image of this request was made with (None: the base model)."""
    if not resolved.adapters:
        return None
    return [AdapterUsed(name=a.name, scale=a.scale) for a in resolved.adapters]


def images_response(
    resolved: ResolvedGeneration,
    usage: Usage,
    b64_images: list[str] | None = None,
    urls: list[str] | None = None,
) -> ImagesResponse:
    """OpenAI's response shape for all three endpoints: base64 images or links, never both."""
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=b64, url=url, seed=seed, lora=adapters_used(resolved))
            for b64, url, seed in zip(
                b64_images or [None] * resolved.n,
                urls or [None] * resolved.n,
                resolved.seeds,
                strict=True,
            )
        ],
        background=resolved.background,
        output_format=resolved.output_format,
        size=resolved.size,
        quality=resolved.quality,
        usage=usage,
    )


def stream_event(
    resolved: ResolvedGeneration,
    endpoint: str,
    image_index: int,
    b64_json: str,
    *,
    partial_index: int | None = None,
    usage: Usage | None = None,
) -> PartialImageEvent | CompletedImageEvent:
    """A preview (with `partial_index`) or a final image (with `usage`) of image `image_index`."""
    fields = {
        "b64_json": b64_json,
        "background": resolved.background,
        "created_at": int(time.time()),
        "output_format": resolved.output_format,
        "quality": resolved.quality,
        "size": resolved.size,
        "image_index": image_index,
        "seed": resolved.seed + image_index,
        "lora": adapters_used(resolved),
    }
    prefix = STREAM_PREFIX[endpoint]
    if usage is None:
        return PartialImageEvent(
            type=f"{prefix}.partial_image", partial_image_index=partial_index, **fields
        )
    return CompletedImageEvent(type=f"{prefix}.completed", usage=usage, **fields)


def sse(event: PartialImageEvent | CompletedImageEvent | ErrorResponse) -> str:
    """A server-sent event as OpenAI sends them: `event:` line, `data:` JSON line, blank line.
    An error's event type is `error` (its data is the usual error envelope)."""
    event_type = getattr(event, "type", "error")
    return f"event: {event_type}\ndata: {event.model_dump_json()}\n\n"


async def signed_file(store: ImageStore, request: Request) -> Response:
    """An image behind a link this server signed (`name`, `expires`, `signature`)."""
    data, media_type = await asyncio.to_thread(
        store.read,
        request.path_params["name"],
        request.query_params.get("expires"),
        request.query_params.get("signature"),
    )
    return Response(data, media_type=media_type, headers={"Cache-Control": "private"})
