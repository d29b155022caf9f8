"""The model deployment: owns one engine, batches requests with one `BatchLoop`, encodes results.

A plain class; `serve_app.app` turns it into a deployment with the options it declares
(`ImageModel.deployment_options`). Flow per request: check the prompt fits the text context
(before batching, so a bad request never joins a call) -> split into chunks of at most
`max_batch_images` -> each chunk waits in the batch loop, which runs compatible chunks of many
requests as one pipeline call, off the event loop -> the request encodes its own images off the
event loop while the next call runs.

Cancellation: when a caller goes away (client disconnect, timeout), Ray Serve cancels the request's
coroutine here. A chunk still queued never runs; a running one is flagged, and the engine stops a
pipeline call at the next step once every request in it is flagged; a batch-mate that is still
wanted keeps the call going and gets its images.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from serve_app.autoscaling import request_work, total_work
from serve_app.batch_loop import BatchLoop
from serve_app.batching import count_images, split_request
from serve_app.codec import encode_image
from serve_app.config import AppArgs, BatchingConfig, ModelConfig
from serve_app.contract import (
    Accepted,
    APIError,
    Completed,
    GenerationCancelled,
    GenerationResult,
    ModelRequest,
    PartialImage,
    PreviewImages,
    Progress,
    StreamEvent,
)
from serve_app.lora import ReplicaAdapters
from serve_app.memory_fit import MemoryFit, batch_limit, one_image_per_call
from serve_app.metrics import ModelMetrics
from serve_app.moderation import Moderation, Refused, thumbnails
from serve_app.provenance import Provenance, provenance_for

logger = logging.getLogger("ray.serve")


def _default_engine_cls(config: ModelConfig):
    """One process on one device, or rank 0 of several (`parallel`)."""
    if config.parallel.degree > 1:
        from serve_app.parallel import ParallelEngine

        return ParallelEngine
    from serve_app.engine import ImageEngine

    return ImageEngine


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve
        return ""


def _torch_threads(config: ModelConfig) -> int:
    """Threads for torch: configured, else the CPUs Ray assigned to this replica."""
    if config.torch_threads:
        return config.torch_threads
    try:
        import ray

        if not ray.is_initialized():  # outside Ray: do not start it just to ask
            raise RuntimeError("not in Ray")
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # noqa: BLE001 - outside Ray
        cpus = 0
    return max(1, round(cpus)) if cpus else max(1, os.cpu_count() or 1)


class ImageMarks:
    """Encodes a request's images with the model's provenance marks (`serve_app.provenance`),
    and signs each with a C2PA manifest where the config has a signing identity."""

    def __init__(self, config: ModelConfig) -> None:
        from serve_app.provenance import C2paSigner

        self.config = config
        c2pa = config.provenance.c2pa  # the config refuses c2pa with provenance turned off
        self.signer = C2paSigner(c2pa) if c2pa is not None else None

    def provenance(self, request: ModelRequest) -> Provenance | None:
        return provenance_for(
            self.config.provenance,
            self.config.id,
            edit=bool(request.conditioning),
            composite=request.masked,
        )

    def encode_all(self, images: Sequence[Any], request: ModelRequest) -> list[bytes]:
        marks = self.provenance(request)
        fmt, compression = request.output_format, request.output_compression
        encoded = [encode_image(image, fmt, compression, provenance=marks) for image in images]
        if self.signer is None or marks is None:
            return encoded
        # An edit's ingredient is the canvas the model was conditioned on (its input images).
        ingredients = [encode_image(canvas, "png") for canvas in request.conditioning]
        try:
            return [self.signer.sign(data, fmt, marks, ingredients) for data in encoded]
        except Exception as exc:  # noqa: BLE001 - e.g. the time-stamp authority is unreachable
            logger.warning("C2PA signing failed for request %s: %r", request.request_id, exc)
            raise APIError(
                "The images could not be signed (C2PA) just now; nothing unsigned is returned. "
                "Try again later.",
                status=503,
                code="provenance_unavailable",
                headers={"Retry-After": "5"},
            ) from None

    def encode_previews(self, request: ModelRequest, previews: PreviewImages) -> list[PartialImage]:
        """Previews carry the marks too (they are images we return), but no C2PA manifest."""
        marks = self.provenance(request)
        fmt, compression = request.output_format, request.output_compression
        return [
            PartialImage(
                image_index=previews.first_image_index + k,
                partial_image_index=previews.partial_index,
                image=encode_image(image, fmt, compression, provenance=marks),
            )
            for k, image in enumerate(previews.images)
        ]


class ImageModel:
    """One replica of one model. `engine_cls` is injectable so unit tests can run without Ray."""

    @staticmethod
    def deployment_options(args: AppArgs, model: ModelConfig) -> dict[str, Any]:
        """Options for `serve.deployment` (a serve config's `deployments:` may override them):
        one replica, `num_cpus` CPUs (and a GPU for `device: cuda`), room to fill two batches;
        with `parallel`, that much per rank in a placement group."""
        actor_options: dict[str, Any] = {"num_cpus": model.num_cpus}
        if model.device == "cuda":
            actor_options["num_gpus"] = 1
        return {
            "name": model.deployment_name,
            "num_replicas": 1,
            "ray_actor_options": actor_options,
            **ImageModel.parallel_options(model, actor_options),
            # Two calls' worth of requests: one running, one queued for the next call.
            "max_ongoing_requests": 2 * args.batching.max_batch_images,
            # Only what was set: an unset max_batch_images is sized to the GPU's memory.
            "user_config": args.batching.model_dump(exclude_unset=True),
            # A batch of large images can take minutes on a slow device.
            "health_check_timeout_s": 120,
            "logging_config": {"enable_access_log": args.access_log},
        }

    @staticmethod
    def parallel_options(model: ModelConfig, actor_options: dict[str, Any]) -> dict[str, Any]:
        """Sequence parallelism: one placement-group bundle per rank, all on one node (Ray's
        way for multi-GPU replicas; Serve replaces the group with the replica). Bundle 0 holds
        the replica itself, bundles 1..N-1 its worker ranks (`serve_app.parallel`)."""
        degree = model.parallel.degree
        if degree == 1:
            return {}
        bundle = {"CPU": actor_options["num_cpus"]}
        if "num_gpus" in actor_options:
            bundle["GPU"] = actor_options["num_gpus"]
        return {
            "placement_group_bundles": [bundle] * degree,
            "placement_group_strategy": "STRICT_PACK",
        }

    def __init__(
        self,
        model_config: dict | ModelConfig,
        engine_cls: Any = None,
        memory_probe: Any = None,
    ) -> None:
        """`memory_probe` measures device memory (default: CUDA's, on a GPU; none on CPU)."""
        self.config = ModelConfig.model_validate(model_config)
        import torch

        torch.set_num_threads(_torch_threads(self.config))
        self.engine = (engine_cls or _default_engine_cls(self.config))(self.config)
        self.engine.load()
        if self.config.warmup:
            self.engine.warmup()
        # Moderation's classifiers (loaded before memory is measured: they share the device) run
        # on their own thread: a check never waits for a pipeline call, nor a call for a check.
        from serve_app.classifiers import load_moderation

        self.moderation: Moderation | None = load_moderation(self.config, self.engine.device)
        self._moderation_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moderation")
        if memory_probe is None and self.engine.device == "cuda":
            from serve_app.engine import CudaMemoryProbe

            memory_probe = CudaMemoryProbe()
        # On a GPU: how big a call fits; caps max_batch_images (memory_fit.py).
        self.memory_fit: MemoryFit | None = None
        self._fit_size = (0, 0)
        if memory_probe:
            self.memory_fit, self._fit_size = self._fit_memory(memory_probe)
        # The pipeline is not thread-safe: one worker runs every call in order.
        self._pipeline_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        defaults = BatchingConfig()
        self.batches = BatchLoop(
            self._run_call, defaults.max_batch_images, defaults.batch_wait_timeout_s
        )
        self.metrics = ModelMetrics(self.config.id)
        self._call_started: float | None = None  # monotonic start of the running pipeline call
        self._steps_left = 0  # of the running call
        self._work_per_s: float | None = None  # measured work rate (autoscaling work units)
        self.adapters = ReplicaAdapters(
            self.config, self.engine, self._pipeline_thread, self.metrics, self._busy_adapters
        )
        self.marks = ImageMarks(self.config)
        self.replica_id = _replica_id()
        logger.info(
            "ImageModel %s ready with %d torch threads", self.config.id, torch.get_num_threads()
        )

    def _fit_memory(self, probe: Any) -> tuple[MemoryFit | None, tuple[int, int]]:
        """Measured at warm-up when it runs (the measurement wins); without a warm-up, the
        plan's prediction for this GPU (`bench plan`) where one applies, else measured. A
        measurement that runs out of memory (its 2-image call: warm-up ran one) leaves one
        image per call: the GPU has just shown that the plan, or any guess, is too large."""
        import torch

        planned, size = self.engine.planned_memory(probe.capacity_bytes())
        if planned is not None and not self.config.warmup:
            return planned, size
        try:
            return self.engine.measure_memory(probe)
        except torch.OutOfMemoryError as exc:
            message = str(exc).splitlines()[0]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # outside the handler: its traceback held the activations
        width, height = size
        fit = one_image_per_call(width, height, probe.capacity_bytes())
        logger.warning(
            "Measuring memory of %s ran out of memory (%s): %s", self.config.id, message,
            fit.describe(width, height),
        )  # fmt: skip
        return fit, size

    def reconfigure(self, user_config: dict) -> None:
        """Apply batching knobs from the deployment's `user_config` (live, no restart).

        On a GPU, an unset `max_batch_images` is capped by what fits in memory, and a set one
        that cannot fit is refused with the measured numbers (the update fails, replicas stay).
        """
        batching = BatchingConfig.model_validate(user_config or {})
        explicit = "max_batch_images" in batching.model_fields_set
        max_images = batch_limit(
            self.memory_fit,
            batching.max_batch_images if explicit else None,
            batching.max_batch_images,
            *self._fit_size,
        )
        max_pixels = self.memory_fit.max_call_pixels if self.memory_fit else None
        self.batches.configure(max_images, batching.batch_wait_timeout_s, max_pixels)
        logger.info(
            "ImageModel %s batching: %s; max_batch_images in use %d, pixels per call %s",
            self.config.id,
            batching.model_dump(),
            max_images,
            max_pixels or "unlimited",
        )

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this periodically when the deployment autoscales; on the replica's
        event loop, where the batch loop lives."""
        return self.autoscaling_stats()

    def autoscaling_stats(self) -> dict[str, float]:
        """The work this replica holds, for `autoscaling.WorkPolicy`: queued and running, in
        work units; also sets the queue-depth and estimated-wait metrics."""
        text = self.config.max_sequence_length
        queued = total_work(self.batches.queued(), text)
        running = sum(
            request_work(request, text, self._steps_left) for request in self.batches.running
        )
        self.metrics.queued_work.set(queued)
        wait = (queued + running) / self._work_per_s if self._work_per_s else 0.0
        self.metrics.estimated_wait.set(wait)
        return {"queued_work": queued, "running_work": running}

    def _busy_adapters(self) -> set[str]:
        requests = [*self.batches.queued(), *self.batches.running]
        return {adapter.name for request in requests for adapter in request.adapters}

    def loaded_adapters(self) -> list[str]:
        """The LoRA adapters loaded on this replica now (operators, tests)."""
        return self.adapters.loaded()

    def check_health(self) -> None:
        """Unhealthy when the model is gone or a pipeline call hangs (e.g. a wedged GPU)."""
        if not self.engine.loaded:
            raise RuntimeError(f"model {self.config.id} is not loaded")
        self.engine.check_health()
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

    async def check_request(self, request: ModelRequest) -> int:
        """The checks a request passes before it may join a call (prompt length, the engine's,
        moderation of the prompt and input images); its text token count. The ingress calls it
        before queueing a job, and every request runs it again here."""
        tokens = self.count_text_tokens(request.prompt)
        self.engine.check_request(request)
        moderation = self.moderation
        if moderation is not None:
            low = request.low_moderation
            if moderation.checks_prompts:
                await self._moderate(
                    request, "prompt", moderation.check_prompt, request.prompt, low
                )
            if moderation.checks_input_images:
                await self._moderate(request, "inputs", self._check_inputs, request, low)
        return tokens

    def _check_inputs(self, request: ModelRequest, low: bool) -> Refused | None:
        """The uploads as the ingress sent them for their check; a request without them (an
        ingress that predates the check, a job queued before moderation was on) has its
        conditioning canvas checked instead, so no input goes unchecked."""
        assert self.moderation is not None
        inputs = request.moderation_inputs
        if not inputs:
            canvases = [*request.conditioning, request.init_image]
            inputs = thumbnails([image for image in canvases if image is not None])
        return self.moderation.check_inputs(inputs, low) if inputs else None

    async def _moderate(self, request: ModelRequest, stage: str, check: Any, *args: Any) -> None:
        """One moderation check on its thread; a refusal is counted and raised."""
        started = time.monotonic()
        refused: Refused | None = await asyncio.get_running_loop().run_in_executor(
            self._moderation_thread, functools.partial(check, *args)
        )
        self.metrics.moderation_seconds.observe(time.monotonic() - started, tags={"stage": stage})
        if refused is not None:
            self.metrics.moderation_refusals.inc(tags={"check": refused.check})
            # Which check refused is logged; what was refused (prompt, pixels) never is.
            logger.info("moderation refused request %s: %s", request.request_id, refused.detail)
            raise refused.error()

    async def generate(self, request: ModelRequest) -> GenerationResult:
        """Generate and encode every image of one request."""
        return await self._generate(request, await self.check_request(request))

    async def generate_stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """Streaming variant: `Accepted` (after validation), `PartialImage`s, `Completed`.

        Previews travel from the pipeline thread through a per-request queue; each is encoded in
        the request's output format off the event loop.
        """
        text_tokens = await self.check_request(request)
        yield Accepted(text_tokens=text_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[PreviewImages | Progress] = asyncio.Queue()

        def send(event: PreviewImages | Progress) -> None:  # from the pipeline thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        cancel = threading.Event()
        request = replace(request, events=send, cancel=cancel)
        task = asyncio.ensure_future(self._generate(request, text_tokens))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                for event in await self._stream_events(request, getter.result()):
                    yield event
            while not queue.empty():
                for event in await self._stream_events(request, queue.get_nowait()):
                    yield event
            yield Completed(result=task.result())
        finally:
            if not task.done():
                cancel.set()
                task.cancel()

    async def _stream_events(
        self, request: ModelRequest, event: PreviewImages | Progress
    ) -> Sequence[PartialImage | Progress]:
        if isinstance(event, Progress):
            return [event]
        if self.moderation is not None and self.moderation.checks_output_images:
            # A preview shows the image to come: it passes the output check before it is sent.
            low = request.low_moderation
            await self._moderate(request, "previews", self._check_previews, event, low, request.n)
        return await asyncio.to_thread(self.marks.encode_previews, request, event)

    def _check_previews(self, previews: PreviewImages, low: bool, total: int) -> Refused | None:
        assert self.moderation is not None
        refused = self.moderation.check_outputs(
            previews.images, low, total, previews.first_image_index
        )
        return Refused("preview", "preview of " + refused.detail) if refused else None

    async def _generate(self, request: ModelRequest, text_tokens: int) -> GenerationResult:
        cancel = request.cancel or threading.Event()
        request = replace(request, cancel=cancel, received_at=time.monotonic())
        chunks = split_request(request, self.batches.images_per_call(request.width, request.height))
        try:
            with self.adapters.pinned(request):
                await self.adapters.acquire(request)
                outcomes = await asyncio.gather(*(self.batches.submit(c) for c in chunks))
        except asyncio.CancelledError:
            cancel.set()  # the engine stops a call once all of its requests are gone
            logger.info("request %s cancelled", request.request_id)
            raise
        images = [image for chunk_images, _ in outcomes for image in chunk_images]
        if self.moderation is not None and self.moderation.checks_output_images:
            # Before encoding: a refused image is never encoded, sent, stored or linked.
            check, low = self.moderation.check_outputs, request.low_moderation
            await self._moderate(request, "outputs", check, images, low, len(images))
        encoded = await asyncio.to_thread(self.marks.encode_all, images, request)
        return GenerationResult(
            images=encoded,
            text_tokens=text_tokens,
            batch_sizes=[images_in_call for _, images_in_call in outcomes],
            served_by=self.replica_id,
        )

    async def _run_call(self, requests: list[ModelRequest]) -> list[Any]:
        """One pipeline call for the batch loop: per request `(images, images_in_call)` or the
        call's exception (a failing call fails only its own requests)."""
        images = count_images(requests)
        if all(request.cancelled for request in requests):
            return [asyncio.CancelledError()] * len(requests)
        started = time.monotonic()
        for request in requests:
            if request.received_at:
                self.metrics.queue_wait.observe(started - request.received_at)
        try:
            await self.adapters.ensure_loaded(requests[0].adapters)
        except Exception as exc:  # noqa: BLE001 - the adapter's error goes to these requests
            return [exc] * len(requests)
        self._call_started = started
        self._steps_left = requests[0].steps
        call = asyncio.get_running_loop().run_in_executor(
            self._pipeline_thread, functools.partial(self.engine.generate, requests, self._on_step)
        )
        # The hung-call clock stops when the thread finishes, even if this task is cancelled.
        call.add_done_callback(lambda _: setattr(self, "_call_started", None))
        try:
            outputs = await call
        except GenerationCancelled as exc:
            logger.info("pipeline call stopped early: %s", exc)
            return [exc] * len(requests)
        except Exception as exc:  # reported to this call's requests only
            logger.exception(
                "pipeline call failed for requests %s", [request.request_id for request in requests]
            )
            return [exc] * len(requests)
        seconds = time.monotonic() - started
        self.metrics.seconds_per_image.observe(seconds / images)
        rate = total_work(requests, self.config.max_sequence_length) / max(seconds, 1e-6)
        self._work_per_s = rate if self._work_per_s is None else 0.7 * self._work_per_s + 0.3 * rate
        self.metrics.images_per_call.observe(images)
        logger.info("pipeline call: %d images from %d requests", images, len(requests))
        return [(output, images) for output in outputs]

    def _on_step(self, step: int, total: int, requests: list[ModelRequest], latents: Any) -> None:
        """Progress of the running pipeline call: debug log per request, and metrics."""
        self._steps_left = total - (step + 1)
        self.metrics.steps.inc(count_images(requests))
        self.metrics.progress.set((step + 1) / total)
        for request in requests:
            if request.report_progress and request.events is not None and not request.cancelled:
                request.events(Progress(step + 1, total))
        if logger.isEnabledFor(logging.DEBUG):
            for request in requests:
                logger.debug("request %s: step %d/%d", request.request_id, step + 1, total)
