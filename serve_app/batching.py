"""Batching policy: which requests can share one pipeline call, how many images a call holds, how a
big request splits. Pure Python; no torch, no Ray, no asyncio (the loop that applies this policy is
`serve_app.batch_loop`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace

from serve_app.contract import ModelRequest


def group_key(request: ModelRequest) -> Hashable:
    """Requests with equal keys produce equal-shaped tensors and can share one pipeline call (and
    the same weights: LoRA adapters and their scales apply to the whole call)."""
    return (
        request.width,
        request.height,
        request.steps,
        request.guidance,
        tuple(getattr(image, "size", ()) for image in request.conditioning),
        request.masked,  # masked edits run in the inpaint pipeline
        request.adapters,
        request.references_key,  # FLUX.2: one reference set per call
    )


def count_images(requests: Sequence[ModelRequest]) -> int:
    """A call's size in images, not requests."""
    return sum(request.n for request in requests)


def split_request(request: ModelRequest, max_images: int) -> list[ModelRequest]:
    """Split a request into chunks of at most `max_images` images, keeping each image's seed and
    index, so a request for more images than a call holds still runs (in several calls)."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if request.n <= max_images:
        return [request]
    return [
        replace(
            request,
            seeds=request.seeds[start : start + max_images],
            first_image_index=request.first_image_index + start,
        )
        for start in range(0, request.n, max_images)
    ]


def images_per_call(width: int, height: int, max_images: int, max_pixels: int | None = None) -> int:
    """The most images of one size a call may hold: `max_images`, fewer when the call's pixels
    are capped (by what fits in the device's memory); never less than one."""
    if max_pixels is None:
        return max_images
    return max(1, min(max_images, max_pixels // (width * height)))


def next_call(
    waiting: Sequence[ModelRequest], max_images: int, max_pixels: int | None = None
) -> list[int]:
    """Indices of the requests the next pipeline call takes from `waiting` (in arrival order).

    The oldest request always goes; later requests join when they share its group key and the
    call stays within `max_images` (and `max_pixels`). Taking everything compatible that waits,
    rather than one fixed batch, keeps calls full under load: requests that arrive while a call
    runs are all there for the next.
    """
    if not waiting:
        return []
    first = waiting[0]
    limit = images_per_call(first.width, first.height, max_images, max_pixels)
    key, taken, images = group_key(first), [0], first.n
    for index in range(1, len(waiting)):
        request = waiting[index]
        if images + request.n <= limit and group_key(request) == key:
            taken.append(index)
            images += request.n
    return taken


def call_is_full(
    waiting: Sequence[ModelRequest], max_images: int, max_pixels: int | None = None
) -> bool:
    """Whether the next call is already as big as it may be (no point waiting for more)."""
    taken = [waiting[i] for i in next_call(waiting, max_images, max_pixels)]
    first = waiting[0]
    return count_images(taken) >= images_per_call(first.width, first.height, max_images, max_pixels)
