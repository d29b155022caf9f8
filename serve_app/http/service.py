"""The images endpoints: read -> resolve -> model request -> model -> shape (sync, streamed,
links), or an asynchronous job.

`ImagesService` talks to models through `ModelClient`s (a Ray deployment handle in the app, a fake
in unit tests), so everything here runs without Ray. Handlers raise `APIError`s; the request
frame (`middleware`) turns them into envelopes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from serve_app.adapters import AdapterRegistry
from serve_app.codec import to_base64
from serve_app.config import AppArgs
from serve_app.contract import (
    Accepted,
    APIError,
    Completed,
    PartialImage,
    StreamEvent,
)
from serve_app.geometry import format_wxh, image_tokens
from serve_app.http import bodies, decoding
from serve_app.http.errors import as_api_error, error_body
from serve_app.http.jobs import JobRoutes, wants_async
from serve_app.http.responses import sse
from serve_app.imageops import Conditioning, prepare_conditioning
from serve_app.metrics import IngressMetrics
from serve_app.model_client import ModelClient, ModelStream
from serve_app.moderation import thumbnails
from serve_app.protocol import ImageOptions, Usage
from serve_app.resolution import ResolvedGeneration, build_usage, resolve_generation
from serve_app.shapes import images_response, stream_event
from serve_app.storage import ImageStore


def adapter_registries(args: AppArgs) -> dict[str, AdapterRegistry]:
    """Each model's LoRA adapter registry (the ingress builds them once for every route)."""
    return {model.id: AdapterRegistry(model.id, model.lora) for model in args.models}


class ImagesService:
    """`POST /v1/images/{generations,edits,variations}` over a model client per model id."""

    def __init__(
        self,
        args: AppArgs,
        models: Mapping[str, ModelClient],
        store: ImageStore,
        metrics: IngressMetrics,
        jobs: JobRoutes | None = None,
        adapters: Mapping[str, AdapterRegistry] | None = None,
    ) -> None:
        self.args = args
        self.limits = args.limits
        self.configs = {model.id: model for model in args.models}
        self.models = models
        self.store = store
        self.metrics = metrics
        self.decoding = decoding.PixelBudget(args.limits.max_decoding_pixels)
        self.adapters = adapters or adapter_registries(args)
        self.jobs = jobs

    async def create_generation(self, request: Request) -> Response:
        parsed = await bodies.read_generation(request, self.limits)
        resolved = resolve_generation(
            parsed,
            self.configs,
            self.args.max_n,
            limits=self.limits,
            key_allows_low=self._key_allows_low(request),
        )
        return await self._dispatch(request, "generation", parsed, resolved)

    def _key_allows_low(self, request: Request) -> bool:
        """Whether the caller's API key may send `moderation: low` (`auth.moderation_low_keys`)."""
        allowed = self.args.auth.moderation_low_keys
        return allowed is None or getattr(request.state, "key_name", None) in allowed

    async def create_edit(self, request: Request) -> Response:
        parsed, uploads = await bodies.read_edit(request, self.limits)
        return await self._with_images(request, "edit", parsed, uploads)

    async def create_variation(self, request: Request) -> Response:
        parsed, uploads = await bodies.read_variation(request, self.limits)
        return await self._with_images(request, "variation", parsed, uploads)

    async def _with_images(
        self,
        request: Request,
        endpoint: str,
        parsed: ImageOptions,
        uploads: bodies.ImageUploads,
    ) -> Response:
        """Probe the inputs, then, within the process's decoding budget, decode them, resolve
        the size from them and build the conditioning at its final size."""
        max_side = max(model.max_side for model in self.configs.values())
        probed = await asyncio.to_thread(decoding.probe_all, uploads, self.limits, max_side)
        pixels = sum(p.decoded_pixels for _, p in probed)
        async with self.decoding.reserve(pixels, self.limits.decode_wait_s):
            inputs = await asyncio.to_thread(
                decoding.decode_all, probed, uploads.mask is not None, max_side
            )
            resolved = resolve_generation(
                parsed,
                self.configs,
                self.args.max_n,
                limits=self.limits,
                input_size=inputs.size,
                masked=inputs.masked,
                input_images=len(inputs.images),
                key_allows_low=self._key_allows_low(request),
            )
            config = self.configs[resolved.model_id]
            output_size = (resolved.width, resolved.height)
            conditioning = await asyncio.to_thread(
                prepare_conditioning,
                inputs.images,
                inputs.mask,
                output_size,
                config.resolution_buckets,
            )
            checked: tuple[Any, ...] = ()
            if config.safety.checks_input_images:  # each input image, as sent, is checked
                checked = await asyncio.to_thread(thumbnails, inputs.images)
            del inputs
        return await self._dispatch(request, endpoint, parsed, resolved, conditioning, checked)

    async def _dispatch(
        self,
        request: Request,
        endpoint: str,
        parsed: ImageOptions,
        resolved: ResolvedGeneration,
        conditioning: Conditioning | None = None,
        moderation_inputs: tuple[Any, ...] = (),
    ) -> Response:
        """Send the model request to its deployment (streamed, or one JSON answer), or queue it as
        an asynchronous job."""
        request.state.summary = {
            "model": resolved.model_id,
            "kind": endpoint,
            "n": resolved.n,
            "size": resolved.size,
            "steps": resolved.steps,
            "inputs": format_wxh(*conditioning.canvas.size) if conditioning else None,
            "stream": resolved.stream,
            "user": parsed.user,
        }
        jobs = self.jobs if wants_async(request) else None
        as_job = jobs is not None
        if parsed.webhook_url and not as_job:
            raise APIError(
                "webhook_url applies to asynchronous jobs: send the header "
                "'Prefer: respond-async'"
                + ("." if self.jobs is not None else " (jobs are turned off on this server)."),
                param="webhook_url",
            )
        if resolved.adapters:
            await asyncio.to_thread(self._check_adapters, resolved)
        model_request = resolved.to_model_request(
            request.state.request_id, conditioning, moderation_inputs
        )
        input_tokens = image_tokens(*conditioning.canvas.size) if conditioning else 0
        model = self.models[resolved.model_id]
        if jobs is not None:
            await model.check_request(model_request)  # e.g. a too-long prompt: 400 now
            return await jobs.submit(
                request, endpoint, resolved, model_request, input_tokens, parsed.webhook_url
            )
        if resolved.stream:
            events = model.stream(model_request)
            return await self._stream(request, endpoint, resolved, events, input_tokens)
        result = await model.generate(model_request)
        usage = build_usage(resolved, result.text_tokens, input_tokens)
        urls = None
        if resolved.response_format == "url":
            base_url = self.args.storage.public_base_url or str(request.base_url)
            urls = await asyncio.to_thread(
                lambda: [
                    self.store.save(image, resolved.output_format, base_url)
                    for image in result.images
                ]
            )

        def encode() -> bytes:
            """base64 + JSON of ten 1024x1024 images takes ~0.1 s: off the shared event loop."""
            b64 = None if urls else [to_base64(image) for image in result.images]
            return images_response(resolved, usage, b64, urls).model_dump_json().encode()

        content = await asyncio.to_thread(encode)
        self._count_output(endpoint, resolved, usage)
        headers = {"x-batch-images": ",".join(str(size) for size in result.batch_sizes)}
        if result.served_by:
            headers["x-served-by"] = result.served_by
        return Response(content, media_type="application/json", headers=headers)

    def _check_adapters(self, resolved: ResolvedGeneration) -> None:
        """404 for an adapter the model does not have (before any work is queued)."""
        registry = self.adapters[resolved.model_id]
        try:
            registry.check([a.name for a in resolved.adapters], resolved.adapters_param)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - S3 unreachable, permissions, ...
            raise APIError(
                f"The adapter store of model {resolved.model_id!r} cannot be read now: "
                f"{type(exc).__name__}. Try again later.",
                status=503,
                code="adapter_store_unavailable",
                headers={"Retry-After": "5"},
            ) from None

    def _count_output(self, endpoint: str, resolved: ResolvedGeneration, usage: Usage) -> None:
        """Images and tokens, labelled the same whether the request streamed or not."""
        model = {"model": resolved.model_id}
        self.metrics.images.inc(resolved.n, tags={"endpoint": endpoint, **model})
        self.metrics.tokens_in.inc(usage.input_tokens, tags=model)
        self.metrics.tokens_out.inc(usage.output_tokens, tags=model)

    async def _stream(
        self,
        request: Request,
        endpoint: str,
        resolved: ResolvedGeneration,
        events: ModelStream,
        image_input_tokens: int,
    ) -> Response:
        """Server-sent events: each image's partial images, then one completed event per image.

        The model's first event comes after its own checks, so a bad request still gets a plain
        JSON error; a failure after the stream started ends it with an `error` event.
        """
        request_id, deadline = request.state.request_id, request.state.deadline
        try:
            accepted = await events.__anext__()
        except BaseException:  # refused, or the time limit hit before the first event
            events.cancel()
            raise
        if not isinstance(accepted, Accepted):
            raise RuntimeError(f"a model stream must start with Accepted, got {accepted!r}")
        usage = build_usage(resolved, accepted.text_tokens, image_input_tokens)

        async def next_event() -> StreamEvent | None:
            """The model's next event, within the request's time limit (None at the end)."""
            try:
                return await asyncio.wait_for(events.__anext__(), deadline - time.monotonic())
            except StopAsyncIteration:
                return None

        def preview_sse(event: PartialImage) -> str:
            b64, partial = to_base64(event.image), event.partial_image_index
            return sse(
                stream_event(resolved, endpoint, event.image_index, b64, partial_index=partial)
            )

        def completed_sse(event: Completed) -> str:
            """One completed event per image, sent together (the request's last events)."""
            return "".join(
                sse(stream_event(resolved, endpoint, index, to_base64(image), usage=usage))
                for index, image in enumerate(event.result.images)
            )

        async def body() -> AsyncIterator[str]:
            try:
                while (event := await next_event()) is not None:
                    if isinstance(event, PartialImage):
                        # base64 + JSON of a 1 MP image: off the event loop the ingress shares.
                        yield await asyncio.to_thread(preview_sse, event)
                    elif isinstance(event, Completed):
                        self._count_output(endpoint, resolved, usage)
                        yield await asyncio.to_thread(completed_sse, event)
            except Exception as exc:  # noqa: BLE001 - headers are sent: report in the stream
                yield sse(error_body(as_api_error(exc, request_id), request_id))
            finally:
                events.cancel()  # a client that left stops the model's work too

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
