"""The model deployment: owns one engine, batches jobs with `@serve.batch`, encodes results.

A plain class; `serve_app.app` turns it into a deployment with options from config. Flow per
request: check the prompt fits the text context (before batching, so a bad request never joins a
batch) -> split into chunks that fit a batch -> `@serve.batch` collects chunks from many requests,
counting images -> compatible groups run as one pipeline call each, off the event loop -> the
request encodes its own images off the event loop while the next batch runs.

Cancellation: when a caller goes away (client disconnect, timeout), Ray Serve cancels the request's
coroutine here. A request still queued never runs (`serve.batch` drops cancelled requests); a
running one is flagged, and the engine stops a pipeline call at the next step once every request
in it is flagged; a batch-mate that is still wanted keeps the call going and gets its images.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ray import serve

from serve_app.batching import (
    GenerationCancelled,
    ImageJob,
    PartialImages,
    check_batch_output,
    count_images,
    next_call,
    split_job,
)
from serve_app.codec import encode_image
from serve_app.config import BatchingConfig, ModelConfig
from serve_app.metrics import ModelMetrics
from serve_app.protocol import APIError

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


@dataclass
class GenerationResult:
    """Encoded images in seed order, plus what the response's `usage` needs."""

    images: list[bytes]
    text_tokens: int
    batch_sizes: list[int]  # images in each batch this request's chunks ran in (observability)


def _default_engine_cls():
    from serve_app.engine import FluxEngine

    return FluxEngine


def _torch_threads(config: ModelConfig) -> int:
    """Threads for torch: configured, else the CPUs Ray assigned to this replica."""
    if config.torch_threads:
        return config.torch_threads
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # noqa: BLE001 - outside Ray
        cpus = 0
    return max(1, round(cpus)) if cpus else max(1, os.cpu_count() or 1)


class ImageModel:
    """One replica of one model. `engine_cls` is injectable so unit tests can run without Ray."""

    def __init__(self, model_config: dict | ModelConfig, engine_cls: Any = None) -> None:
        self.config = ModelConfig.model_validate(model_config)
        import torch

        torch.set_num_threads(_torch_threads(self.config))
        self.engine = (engine_cls or _default_engine_cls())(self.config)
        self.engine.load()
        if self.config.warmup:
            self.engine.warmup()
        # The pipeline is not thread-safe: one worker runs every call in order.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._max_batch_images = _DEFAULT_BATCHING.max_batch_images
        self.metrics = ModelMetrics(self.config.id)
        self._call_started: float | None = None  # monotonic start of the running pipeline call
        self._waiting: list[tuple[ImageJob, asyncio.Future]] = []  # jobs not yet in a call
        self._drainer: asyncio.Future | None = None
        logger.info(
            "ImageModel %s ready with %d torch threads", self.config.id, torch.get_num_threads()
        )

    def reconfigure(self, user_config: dict) -> None:
        """Apply batching knobs from the deployment's `user_config` (live, no restart)."""
        batching = BatchingConfig.model_validate(user_config or {})
        self._max_batch_images = batching.max_batch_images
        self._run_batch.set_max_batch_size(batching.max_batch_images)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        logger.info("ImageModel %s batching: %s", self.config.id, batching.model_dump())

    def check_health(self) -> None:
        """Unhealthy when the model is gone or a pipeline call hangs (e.g. a wedged GPU)."""
        if not self.engine.loaded:
            raise RuntimeError(f"model {self.config.id} is not loaded")
        started = self._call_started
        if started is not None:
            running = time.monotonic() - started
            if running > self.config.max_pipeline_call_s:
                raise RuntimeError(
                    f"a pipeline call has run for {running:.0f}s, over max_pipeline_call_s "
                    f"({self.config.max_pipeline_call_s:.0f}s): treating the replica as hung"
                )

    def count_text_tokens(self, prompt: str) -> int:
        tokens = self.engine.count_text_tokens(prompt)
        limit = self.config.max_sequence_length
        if tokens > limit:
            raise APIError(
                f"The prompt is {tokens} tokens long; model {self.config.id!r} accepts at most "
                f"{limit} text tokens. Shorten the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        return tokens

    async def generate(self, job: ImageJob) -> GenerationResult:
        """Generate and encode every image of one request."""
        return await self._generate(job, self.count_text_tokens(job.prompt))

    async def generate_stream(self, job: ImageJob) -> AsyncIterator[dict]:
        """Streaming variant: `accepted` (after validation), `partial` previews, `completed`.

        Previews travel from the pipeline thread through a per-request queue; each is encoded in
        the request's output format off the event loop.
        """
        text_tokens = self.count_text_tokens(job.prompt)
        yield {"type": "accepted", "text_tokens": text_tokens}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = replace(
            job,
            events=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
            cancel=threading.Event(),
        )
        task = asyncio.ensure_future(self._generate(job, text_tokens))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                for event in await asyncio.to_thread(self._encode_partials, job, getter.result()):
                    yield event
            while not queue.empty():
                for event in await asyncio.to_thread(
                    self._encode_partials, job, queue.get_nowait()
                ):
                    yield event
            yield {"type": "completed", "result": task.result()}
        finally:
            if not task.done():
                job.cancel.set()
                task.cancel()

    @staticmethod
    def _encode_partials(job: ImageJob, event: PartialImages) -> list[dict]:
        return [
            {
                "type": "partial",
                "image_index": event.first_image_index + k,
                "partial_image_index": event.partial_index,
                "image": encode_image(image, job.output_format, job.output_compression),
            }
            for k, image in enumerate(event.images)
        ]

    async def _generate(self, job: ImageJob, text_tokens: int) -> GenerationResult:
        if job.cancel is None:
            job = replace(job, cancel=threading.Event())
        job = replace(job, received_at=time.monotonic())
        chunks = split_job(job, self._max_batch_images)
        try:
            outcomes = await asyncio.gather(*(self._outcome(chunk) for chunk in chunks))
        except asyncio.CancelledError:
            job.cancel.set()  # the engine stops a call once all of its requests are gone
            logger.info("request %s cancelled", job.request_id)
            raise
        images, batch_sizes = [], []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            chunk_images, batch_size = outcome
            images.extend(chunk_images)
            batch_sizes.append(batch_size)
        encoded = await asyncio.to_thread(
            lambda: [encode_image(im, job.output_format, job.output_compression) for im in images]
        )
        return GenerationResult(images=encoded, text_tokens=text_tokens, batch_sizes=batch_sizes)

    @serve.batch(
        max_batch_size=_DEFAULT_BATCHING.max_batch_images,
        batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s,
        batch_size_fn=count_images,
    )
    async def _run_batch(self, jobs: list[ImageJob]) -> list[asyncio.Future]:
        return self.run_jobs(jobs)

    def run_jobs(self, jobs: list[ImageJob]) -> list[asyncio.Future]:
        """Queue a batch's jobs for the pipeline; return, per job, a future of its outcome.

        `@serve.batch` gathers concurrent requests (counting images); its batch returns at once,
        and the jobs wait here until the pipeline is free. Each pipeline call then takes every
        compatible waiting job up to `max_batch_images` (`next_call`), so requests that arrive
        while a call runs all ride the next one: calls stay full under load instead of being cut
        every `batch_wait_timeout_s`. A failing call fails only its own jobs. Each future gives
        `(images, images_in_call)` or the exception.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures, strict=True))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        check_batch_output(jobs, futures)
        return futures

    async def _outcome(self, chunk: ImageJob) -> Any:
        return await (await self._run_batch(chunk))

    async def _drain(self) -> None:
        """Run pipeline calls, one at a time, until nothing waits."""
        while self._waiting:
            taken = next_call([job for job, _ in self._waiting], self._max_batch_images)
            chosen = [self._waiting[i] for i in taken]
            for index in reversed(taken):
                del self._waiting[index]
            await self._call([job for job, _ in chosen], [future for _, future in chosen])

    async def _call(self, jobs: list[ImageJob], futures: list[asyncio.Future]) -> None:
        """One pipeline call; every job's future gets its images or the call's exception."""
        images = count_images(jobs)
        if all(job.cancelled for job in jobs):
            outputs: list[Any] = [asyncio.CancelledError()] * len(jobs)
        else:
            started = time.monotonic()
            for job in jobs:
                if job.received_at:
                    self.metrics.queue_wait.observe(started - job.received_at)
            self._call_started = started
            call = asyncio.get_running_loop().run_in_executor(
                self._pipeline_thread, functools.partial(self.engine.generate, jobs, self._on_step)
            )
            # The hung-call clock stops when the thread finishes, even if this task is cancelled.
            call.add_done_callback(lambda _: setattr(self, "_call_started", None))
            try:
                outputs = [(output, images) for output in await call]
                self.metrics.seconds_per_image.observe((time.monotonic() - started) / images)
                logger.info("pipeline call: %d images from %d requests", images, len(jobs))
            except GenerationCancelled as exc:
                logger.info("pipeline call stopped early: %s", exc)
                outputs = [exc] * len(jobs)
            except Exception as exc:  # noqa: BLE001 - reported to this call's requests only
                logger.exception(
                    "pipeline call failed for requests %s", [job.request_id for job in jobs]
                )
                outputs = [exc] * len(jobs)
        for future, output in zip(futures, outputs, strict=True):
            if not future.done():
                future.set_result(output)

    def _on_step(self, step: int, total: int, jobs: list[ImageJob], latents: Any) -> None:
        """Progress of the running pipeline call: debug log per request, and metrics."""
        self.metrics.steps.inc(count_images(jobs))
        self.metrics.progress.set((step + 1) / total)
        if logger.isEnabledFor(logging.DEBUG):
            for job in jobs:
                logger.debug("request %s: step %d/%d", job.request_id, step + 1, total)
