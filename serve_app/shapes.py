"""Shape model results into OpenAI's answers: the images response and the stream's events.

No Starlette and no HTTP: the synchronous routes (`serve_app.http.service`) and the job objects
and webhooks of `serve_app.jobs` build the same bodies from here.
"""

from __future__ import annotations

import time
from typing import Any

from serve_app.protocol import (
    AdapterUsed,
    CompletedImageEvent,
    CompletedImageType,
    ImageData,
    ImagesResponse,
    PartialImageEvent,
    PartialImageType,
    Usage,
)
from serve_app.resolution import ResolvedGeneration

# The stream's event types per endpoint (OpenAI streams generations and edits).
STREAM_TYPES: dict[str, tuple[PartialImageType, CompletedImageType]] = {
    "generation": ("image_generation.partial_image", "image_generation.completed"),
    "edit": ("image_edit.partial_image", "image_edit.completed"),
}
# The event-type prefix per endpoint: `image_generation`, `image_edit`.
STREAM_PREFIX = {
    endpoint: partial.partition(".")[0] for endpoint, (partial, _) in STREAM_TYPES.items()
}


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
    nothing: list[str | None] = [None] * resolved.n
    b64s: list[str | None] = list(b64_images) if b64_images else nothing
    links: list[str | None] = list(urls) if urls else nothing
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=b64, url=url, seed=seed, lora=adapters_used(resolved))
            for b64, url, seed in zip(b64s, links, resolved.seeds, strict=True)
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
    fields: dict[str, Any] = {
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
    partial_type, completed_type = STREAM_TYPES[endpoint]
    if usage is None:
        if partial_index is None:
            raise ValueError("a preview event needs its partial_index")
        return PartialImageEvent(type=partial_type, partial_image_index=partial_index, **fields)
    return CompletedImageEvent(type=completed_type, usage=usage, **fields)
