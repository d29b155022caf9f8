"""Batching policy: what a job is, which jobs can share one pipeline call, how big jobs split.

Pure Python; no torch, no Ray. The model deployment gathers jobs with Ray Serve's `@serve.batch`
(which counts images with `count_images`); `next_call` then picks, from the jobs waiting for the
pipeline, those that can run together as one pipeline call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from serve_app.protocol import ResolvedGeneration


@dataclass(frozen=True)
class ImageJob:
    """One request's work for the model: a prompt, a geometry and one seed per image.

    ``conditioning`` holds the input image canvas that Kontext conditions on (edits, variations),
    already at its final size; masked edits add ``init_image`` (the image to inpaint, at the output
    size) and ``mask`` (L mode, 255 = editable). ``events`` is a per-request sink for previews
    (`PartialImages`) at ``preview_steps``, called from the engine's step callback; ``cancel`` is
    set when the request goes away, so the engine can stop a pipeline call that only cancelled
    requests still wait for. ``first_image_index`` is the position of this job's first image in
    its request (a request split into chunks keeps its image numbering).
    """

    request_id: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    output_format: str = "png"
    output_compression: int = 100
    conditioning: tuple[Any, ...] = ()
    init_image: Any = None
    mask: Any = None
    preview_steps: tuple[int, ...] = ()
    first_image_index: int = 0
    events: Callable[[Any], None] | None = field(default=None, compare=False, repr=False)
    cancel: Any = field(default=None, compare=False, repr=False)  # a threading.Event
    received_at: float = field(default=0.0, compare=False)  # monotonic, when the replica got it

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def conditioning_shape(self) -> tuple[tuple[int, int], ...]:
        """Sizes of conditioning images; jobs share a call only if these match."""
        return tuple(getattr(image, "size", ()) for image in self.conditioning)

    def group_key(self) -> Hashable:
        """Jobs with equal keys produce equal-shaped tensors and can share one pipeline call."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.conditioning_shape,
            self.mask is not None,  # masked edits run in the inpaint pipeline
        )

    @classmethod
    def from_resolved(
        cls,
        request_id: str,
        resolved: ResolvedGeneration,
        conditioning: tuple[Any, ...] = (),
        init_image: Any = None,
        mask: Any = None,
        partial_images: int = 0,
    ) -> ImageJob:
        return cls(
            request_id=request_id,
            prompt=resolved.prompt,
            width=resolved.width,
            height=resolved.height,
            steps=resolved.steps,
            guidance=resolved.guidance,
            seeds=tuple(resolved.seeds),
            output_format=resolved.output_format,
            output_compression=resolved.output_compression,
            conditioning=conditioning,
            init_image=init_image,
            mask=mask,
            preview_steps=preview_steps(partial_images, resolved.steps),
        )


def count_images(jobs: Sequence[ImageJob]) -> int:
    """Batch size in images, not requests (`serve.batch`'s `batch_size_fn`)."""
    return sum(job.n for job in jobs)


def split_job(job: ImageJob, max_images: int) -> list[ImageJob]:
    """Split a job into chunks of at most `max_images` images, keeping each image's seed.

    A request for more images than a batch holds would otherwise be refused by the batch queue.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if job.n <= max_images:
        return [job]
    return [
        replace(
            job,
            seeds=job.seeds[start : start + max_images],
            first_image_index=job.first_image_index + start,
        )
        for start in range(0, job.n, max_images)
    ]


class GenerationCancelled(RuntimeError):
    """Every request of a pipeline call went away; the call stopped at a step boundary."""


@dataclass(frozen=True)
class PartialImages:
    """Previews of a job's images after denoising step `step` (0-based)."""

    partial_index: int
    step: int
    first_image_index: int
    images: list[Any]


def preview_steps(partial_images: int, steps: int) -> tuple[int, ...]:
    """Evenly spaced steps (0-based, before the last) after which to send previews.

    `partial_images` previews split the run into equal parts; with too few steps, fewer previews
    are sent (never a duplicate, never the final image).
    """
    if partial_images <= 0 or steps <= 1:
        return ()
    chosen = {round((k + 1) * steps / (partial_images + 1)) - 1 for k in range(partial_images)}
    return tuple(sorted(step for step in chosen if 0 <= step < steps - 1))


def next_call(waiting: Sequence[ImageJob], max_images: int) -> list[int]:
    """Indices of the jobs the next pipeline call takes from `waiting` (in arrival order).

    The oldest job always goes; later jobs join when they share its group key and the call stays
    within `max_images`. Taking everything compatible that waits, rather than one fixed batch,
    keeps calls full under load: requests that arrive while a call runs are all there for the next.
    """
    if not waiting:
        return []
    key, taken, images = waiting[0].group_key(), [0], waiting[0].n
    for index in range(1, len(waiting)):
        job = waiting[index]
        if job.group_key() == key and images + job.n <= max_images:
            taken.append(index)
            images += job.n
    return taken


def check_batch_output(jobs: Sequence[Any], results: Sequence[Any]) -> None:
    """A batch function must answer every job exactly once."""
    if len(results) != len(jobs):
        raise RuntimeError(
            f"batch produced {len(results)} results for {len(jobs)} jobs; every job needs exactly "
            "one result"
        )
