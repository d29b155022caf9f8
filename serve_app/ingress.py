"""HTTP ingress: Starlette routes for the OpenAI Images API, and the one place errors become JSON.

Parse -> validate (`serve_app.protocol`) -> call the model deployment through its handle -> shape
the response. Never imports torch. Every non-2xx answer, whatever raised it, goes through
`error_response`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve_app.auth import KeyStore
from serve_app.batching import ImageJob
from serve_app.codec import UploadError, decode_data_url, decode_upload, to_base64
from serve_app.config import AppArgs, UploadLimits
from serve_app.imageops import prepare_conditioning
from serve_app.metrics import IngressMetrics
from serve_app.openapi import openapi_document
from serve_app.protocol import (
    APIError,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOptions,
    ImageVariationRequest,
    ModelCard,
    ModelList,
    ResolvedGeneration,
    build_images_response,
    build_usage,
    image_tokens,
    parse_model,
    resolve_generation,
    sse,
    stream_event,
)
from serve_app.storage import FILES_ROUTE, LocalImageStore, make_store

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
Handler = Callable[[Request], Awaitable[Response]]


def error_response(exc: Exception, request_id: str | None = None) -> JSONResponse:
    """Turn any exception into OpenAI's error envelope; unknown ones are a logged, opaque 500."""
    if isinstance(exc, APIError):
        error = exc
    elif isinstance(exc, HTTPException):
        error = _http_exception_to_api_error(exc)
    elif isinstance(exc, (RayActorError, ActorUnavailableError)):
        logger.warning("request %s lost its model replica: %s", request_id, exc)
        error = APIError(
            "The model replica serving this request failed; it is being replaced. Retry shortly.",
            status=503,
            code="model_unavailable",
            headers={"Retry-After": "1"},
        )
    elif isinstance(exc, BackPressureError):
        error = APIError(
            "The server is at capacity; retry shortly.",
            status=429,
            code="server_overloaded",
            headers={"Retry-After": "1"},
        )
    elif isinstance(exc, TimeoutError):
        error = APIError(
            "The request took longer than the server's time limit and was cancelled.",
            status=504,
            code="timeout",
        )
    else:
        logger.error("request %s failed", request_id, exc_info=exc)
        error = APIError(
            "The server had an error while processing the request.",
            status=500,
            code="internal_error",
        )
    body = error.to_body()
    if request_id:
        body["error"]["message"] += f" (request id {request_id})"
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _http_exception_to_api_error(exc: HTTPException) -> APIError:
    if exc.status_code == 404:
        return APIError("Not found: no such route.", status=404, code="not_found")
    if exc.status_code == 405:
        return APIError(
            "Method not allowed for this route.",
            status=405,
            code="method_not_allowed",
            headers=dict(exc.headers or {}),
        )
    return APIError(str(exc.detail), status=exc.status_code)


def _unwrap_remote_error(exc: BaseException) -> BaseException:
    """Ray wraps replica exceptions; an APIError raised in a replica should reach the client."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, APIError):
        return exc
    if isinstance(cause, APIError):
        return cause
    return exc


def current_request_id(request: Request) -> str:
    """Ray Serve's request id (the `x-request-id` header, else generated; the proxy echoes it)."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - private API; fall back to our own id
        request_id = None
    return request_id or request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex


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


async def read_multipart(
    request: Request, limits: UploadLimits, file_fields: tuple[str, ...]
) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """Scalar fields and (field name, bytes) uploads, in order, with explicit limits.

    File fields other than `file_fields` are refused: nothing the client sent is dropped silently.
    """
    if "content-length" not in request.headers:
        raise APIError(
            "multipart uploads need a Content-Length header.",
            status=411,
            code="length_required",
        )
    try:
        form = await request.form(
            max_files=limits.max_input_images + 1, max_fields=64, max_part_size=1024 * 1024
        )
    except (MultiPartException, HTTPException) as exc:
        message = getattr(exc, "message", None) or getattr(exc, "detail", str(exc))
        if "Too many files" in message:
            raise APIError(
                f"Too many files: at most {limits.max_input_images} images (and one mask).",
                param=file_fields[0],
            ) from None
        raise APIError(f"Invalid multipart/form-data body: {message}") from None
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in file_fields:
                    raise APIError(
                        f"Unexpected file field {key!r}; this endpoint takes "
                        f"{', '.join(repr(f) for f in file_fields)}.",
                        param=key,
                    )
                if value.size is not None and value.size > limits.max_image_bytes:
                    raise APIError(
                        f"The file in {key!r} is {value.size} bytes; the limit is "
                        f"{limits.max_image_bytes} bytes.",
                        status=413,
                        param=key,
                        code="file_too_large",
                    )
                files.append((key, await value.read()))
            elif key in fields:
                raise APIError(f"Parameter {key!r} was sent more than once.", param=key)
            else:
                fields[key] = value
    finally:
        await form.close()
    return fields, files


def decode_inputs(
    uploads: list[tuple[str, bytes]], limits: UploadLimits, as_mask: bool = False
) -> list:
    """Decode uploads; a bad one is a 400 (or 413) naming its field."""
    images = []
    for param, data in uploads:
        try:
            image = decode_upload(
                data,
                max_bytes=limits.max_image_bytes,
                max_pixels=limits.max_input_pixels,
                as_mask=as_mask,
            )
        except UploadError as exc:
            raise APIError(
                f"Invalid image in {param!r}: {exc}.", status=exc.status, param=param
            ) from None
        images.append(image)
    return images


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than `limit` bytes even without a Content-Length."""
    check_body_size(request, limit)
    chunks, size = [], 0
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


async def read_json(request: Request, limit: int) -> object:
    body = await read_body(request, limit)
    if not body:
        raise APIError("The request body is empty; send a JSON object.")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"The request body is not valid JSON: {exc}.") from None


def _needs_key(path: str) -> bool:
    return path.startswith("/v1/") and not path.startswith(FILES_ROUTE + "/")


class ImagesIngress:
    """The HTTP front door; `model_handles` maps model id -> model deployment handle."""

    def __init__(self, args: dict, model_handles: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.models = {model.id: model for model in self.args.models}
        self.handles = model_handles
        self.limits = self.args.limits
        self.store = make_store(self.args.storage)
        self.keys = KeyStore.from_config(self.args.auth)
        self.metrics = IngressMetrics()
        self._openapi = openapi_document(self.args)
        self.created = int(time.time())
        logger.info(
            "ImagesIngress: models %s, API keys %s",
            list(self.models),
            f"required ({len(self.keys)} configured)" if self.keys else "not required",
        )
        try:
            self._cleanup_task = asyncio.get_running_loop().create_task(self._cleanup_loop())
        except RuntimeError:  # constructed outside an event loop (tests): no background cleanup
            self._cleanup_task = None

    def __serve_build_asgi_app__(self) -> Starlette:
        table = [
            ("/v1/images/generations", self.create_generation, "POST"),
            ("/v1/images/edits", self.create_edit, "POST"),
            ("/v1/images/variations", self.create_variation, "POST"),
            (FILES_ROUTE + "/{name}", self.get_file, "GET"),
            ("/v1/models", self.list_models, "GET"),
            ("/v1/models/{model:path}", self.get_model, "GET"),
            ("/health", self.health, "GET"),
            ("/openapi.json", self.openapi, "GET"),
        ]
        routes = [
            Route(path, self._wrap(handler, path), methods=[method])
            for path, handler, method in table
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            return error_response(exc, current_request_id(request))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    def _wrap(self, handler: Handler, route: str) -> Handler:
        """Every route's frame: id, API key, time limit, errors to envelopes, metrics, one log line.

        Signed image links (`/v1/images/files/...`) carry their own authorisation; `/health` is
        open so load balancers can probe it.
        """

        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            state = request.state
            state.request_id = current_request_id(request)
            state.key_name, state.summary = "-", {}
            try:
                if self.keys is not None and _needs_key(request.url.path):
                    state.key_name = self.keys.identify(request.headers.get("authorization"))
                state.deadline = started + self.limits.request_timeout_s
                response = await asyncio.wait_for(handler(request), self.limits.request_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the one place errors become envelopes
                exc = _unwrap_remote_error(exc)
                self._count_rejection(exc)
                response = error_response(exc, state.request_id)
            self._record(request, route, response.status_code, time.monotonic() - started)
            return response

        return endpoint

    def _count_rejection(self, exc: BaseException) -> None:
        status = getattr(exc, "status", None)
        if status == 401:
            self.metrics.rejected.inc(tags={"reason": "auth"})
        elif isinstance(exc, BackPressureError) or status == 429:
            self.metrics.rejected.inc(tags={"reason": "backpressure"})
        elif status == 413:
            self.metrics.rejected.inc(tags={"reason": "too_large"})

    def _record(self, request: Request, route: str, status: int, seconds: float) -> None:
        """Metrics and one structured log line per request (streams: when the headers go).

        Metrics are tagged with the route template, never the raw path (bounded label values).
        """
        state = request.state
        model = state.summary.get("model", "-")
        tags = {"endpoint": route, "model": model, "status": str(status), "key": state.key_name}
        try:
            self.metrics.requests.inc(tags=tags)
            self.metrics.latency.observe(seconds, tags={"endpoint": route, "model": model})
        except Exception:  # noqa: BLE001 - metrics must never break a response
            logger.exception("could not record metrics for request %s", state.request_id)
        logger.info(
            "request_done %s",
            json.dumps(
                {
                    "id": state.request_id,
                    "endpoint": route,
                    "path": request.url.path,
                    "key": state.key_name,
                    **state.summary,
                    "status": status,
                    "seconds": round(seconds, 4),
                }
            ),
        )

    # --- endpoints ---------------------------------------------------------------------------

    async def create_generation(self, request: Request) -> Response:
        check_body_size(request, self.limits.max_request_bytes)
        parsed = parse_model(
            ImageGenerationRequest, await read_json(request, self.limits.max_json_bytes)
        )
        resolved = resolve_generation(parsed, self.models, self.args.max_n, limits=self.limits)
        return await self._run(request, "generation", parsed, resolved)

    async def create_edit(self, request: Request) -> Response:
        """Multipart (`image` / `image[]`, `mask`) or JSON (`images[].image_url`, `mask`)."""
        check_body_size(request, self.limits.max_request_bytes)
        kind = content_type(request)
        if kind == "multipart/form-data":
            fields, files = await read_multipart(request, self.limits, ("image", "image[]", "mask"))
            parsed = parse_model(ImageEditRequest, fields)
            image_uploads = [(name, data) for name, data in files if name != "mask"]
            mask_uploads = [(name, data) for name, data in files if name == "mask"]
        elif kind == "application/json":
            parsed = parse_model(
                ImageEditRequest, await read_json(request, self.limits.max_request_bytes)
            )
            image_uploads = [
                self._data_url(ref, f"images[{i}]") for i, ref in enumerate(parsed.images or [])
            ]
            mask_uploads = [self._data_url(parsed.mask, "mask")] if parsed.mask else []
        else:
            raise APIError(
                "Send edits as multipart/form-data (image files) or application/json (data: URLs).",
                status=415,
                code="unsupported_media_type",
            )
        if len(mask_uploads) > 1:
            raise APIError("Send at most one mask.", param="mask")
        return await self._run_with_images(
            request, "edit", parsed, image_uploads, mask_uploads[0] if mask_uploads else None
        )

    async def create_variation(self, request: Request) -> Response:
        check_body_size(request, self.limits.max_request_bytes)
        if content_type(request) != "multipart/form-data":
            raise APIError(
                "Send variations as multipart/form-data with one 'image' file.",
                status=415,
                code="unsupported_media_type",
            )
        fields, files = await read_multipart(request, self.limits, ("image",))
        parsed = parse_model(ImageVariationRequest, fields)
        if len(files) > 1:
            raise APIError("Variations take exactly one 'image'.", param="image")
        return await self._run_with_images(request, "variation", parsed, files, None)

    async def get_file(self, request: Request) -> Response:
        if not isinstance(self.store, LocalImageStore):
            raise APIError("No such image.", status=404, code="not_found")
        data, media_type = await asyncio.to_thread(
            self.store.read,
            request.path_params["name"],
            request.query_params.get("expires"),
            request.query_params.get("signature"),
        )
        return Response(data, media_type=media_type, headers={"Cache-Control": "private"})

    async def list_models(self, request: Request) -> Response:
        cards = [ModelCard(id=model_id, created=self.created) for model_id in self.models]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model"]
        if model_id not in self.models:
            raise APIError(
                f"The model {model_id!r} does not exist.",
                status=404,
                param="model",
                code="model_not_found",
            )
        return JSONResponse(ModelCard(id=model_id, created=self.created).model_dump())

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)

    async def health(self, request: Request) -> Response:
        """200 once every model deployment reports healthy to the Serve controller."""
        statuses = await asyncio.to_thread(self._model_statuses)
        unhealthy = {name: status for name, status in statuses.items() if status != "HEALTHY"}
        if unhealthy:
            raise APIError(
                f"Model deployments not ready: {unhealthy}.", status=503, code="not_ready"
            )
        return JSONResponse({"status": "ok", "models": statuses})

    # --- shared steps ----------------------------------------------------------------------------

    @staticmethod
    def _data_url(ref, param: str) -> tuple[str, bytes]:
        if ref.image_url is None:
            raise APIError(
                "Only image_url with a data: URL is supported (file_id is not).",
                param=f"{param}.image_url",
            )
        try:
            return f"{param}.image_url", decode_data_url(ref.image_url)
        except UploadError as exc:
            raise APIError(
                f"Invalid {param}.image_url: {exc}.", param=f"{param}.image_url"
            ) from None

    async def _run_with_images(
        self,
        request: Request,
        endpoint: str,
        parsed: ImageOptions,
        image_uploads: list[tuple[str, bytes]],
        mask_upload: tuple[str, bytes] | None,
    ) -> Response:
        """Decode and check input images, resolve the size from them, build the conditioning."""
        if not image_uploads:
            raise APIError("Missing required parameter: 'image'.", param="image")
        if len(image_uploads) > self.limits.max_input_images:
            raise APIError(
                f"{len(image_uploads)} images sent; at most {self.limits.max_input_images} "
                "are accepted.",
                param=image_uploads[0][0],
            )
        images = await asyncio.to_thread(decode_inputs, image_uploads, self.limits)
        mask = None
        if mask_upload is not None:
            [mask] = await asyncio.to_thread(
                decode_inputs, [mask_upload], self.limits, as_mask=True
            )
            if mask.size != images[0].size:
                raise APIError(
                    f"The mask is {mask.size[0]}x{mask.size[1]} but the image is "
                    f"{images[0].size[0]}x{images[0].size[1]}; they must match.",
                    param="mask",
                )
        resolved = resolve_generation(
            parsed,
            self.models,
            self.args.max_n,
            limits=self.limits,
            input_size=images[0].size,
            masked=mask is not None,
        )
        buckets = self.models[resolved.model_id].resolution_buckets
        conditioning = await asyncio.to_thread(
            prepare_conditioning, images, mask, (resolved.width, resolved.height), buckets
        )
        return await self._run(request, endpoint, parsed, resolved, conditioning)

    async def _run(
        self,
        request: Request,
        endpoint: str,
        parsed: ImageOptions,
        resolved: ResolvedGeneration,
        conditioning=None,
    ) -> Response:
        """Send the job to its model deployment and shape the OpenAI response."""
        request_id = request.state.request_id
        request.state.summary = {
            "model": resolved.model_id,
            "kind": endpoint,
            "n": resolved.n,
            "size": resolved.size,
            "steps": resolved.steps,
            "inputs": "x".join(map(str, conditioning.canvas.size)) if conditioning else None,
            "stream": resolved.stream,
            "user": parsed.user,
        }
        job = ImageJob.from_resolved(
            request_id,
            resolved,
            conditioning=(conditioning.canvas,) if conditioning else (),
            init_image=conditioning.init_image if conditioning else None,
            mask=conditioning.mask if conditioning else None,
            partial_images=resolved.partial_images,
        )
        image_input_tokens = image_tokens(*conditioning.canvas.size) if conditioning else 0
        if resolved.stream:
            kind = "image_edit" if endpoint == "edit" else "image_generation"
            return await self._stream(request, kind, resolved, job, image_input_tokens)
        result = await self.handles[resolved.model_id].generate.remote(job)
        urls = None
        if resolved.response_format == "url":
            base_url = self.args.storage.public_base_url or str(request.base_url)
            urls = await asyncio.to_thread(
                lambda: [
                    self.store.save(image, resolved.output_format, base_url)
                    for image in result.images
                ]
            )

        def encode_body():
            """base64 + JSON of the whole response: ~0.1 s for ten 1024x1024 images, so it
            runs off the event loop that every other request of this ingress shares."""
            b64_images = None if urls else [to_base64(image) for image in result.images]
            body = build_images_response(
                resolved,
                b64_images,
                result.text_tokens,
                image_input_tokens=image_input_tokens,
                urls=urls,
            )
            return body, body.model_dump_json().encode()

        body, content = await asyncio.to_thread(encode_body)
        self._count_output(endpoint, resolved, body.usage)
        headers = {"x-batch-images": ",".join(str(size) for size in result.batch_sizes)}
        return Response(content, media_type="application/json", headers=headers)

    def _count_output(self, endpoint: str, resolved: ResolvedGeneration, usage) -> None:
        model = {"model": resolved.model_id}
        self.metrics.images.inc(resolved.n, tags={"endpoint": endpoint, **model})
        self.metrics.tokens_in.inc(usage.input_tokens, tags=model)
        self.metrics.tokens_out.inc(usage.output_tokens, tags=model)

    async def _stream(
        self,
        request: Request,
        kind: str,
        resolved: ResolvedGeneration,
        job: ImageJob,
        image_input_tokens: int,
    ) -> Response:
        """Server-sent events: each image's partial images, then one completed event per image.

        The model's first event comes after validation, so a bad request still gets a plain JSON
        error; a failure after the stream started ends it with an `error` event.
        """
        request_id, deadline = request.state.request_id, request.state.deadline
        handle = self.handles[resolved.model_id].options(stream=True)
        events = handle.generate_stream.remote(job)
        accepted = await events.__anext__()

        async def next_event():
            """The model's next event, within the request's time limit (None at the end)."""
            try:
                return await asyncio.wait_for(events.__anext__(), deadline - time.monotonic())
            except StopAsyncIteration:
                return None

        async def body():
            try:
                while (item := await next_event()) is not None:
                    if item["type"] == "partial":
                        event = stream_event(
                            resolved,
                            kind,
                            item["image_index"],
                            to_base64(item["image"]),
                            partial_image_index=item["partial_image_index"],
                        )
                        yield sse(event["type"], event)
                    elif item["type"] == "completed":
                        usage = build_usage(resolved, accepted["text_tokens"], image_input_tokens)
                        self._count_output(kind, resolved, usage)
                        for index, image in enumerate(item["result"].images):
                            event = stream_event(
                                resolved, kind, index, to_base64(image), usage=usage
                            )
                            yield sse(event["type"], event)
            except Exception as exc:  # noqa: BLE001 - headers are sent: report in the stream
                failure = error_response(_unwrap_remote_error(exc), request_id)
                yield sse("error", json.loads(failure.body))
            finally:
                events.cancel()  # a client that left stops the model's work too

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _cleanup_loop(self) -> None:
        """Delete expired url images periodically."""
        while True:
            await asyncio.sleep(self.args.storage.cleanup_interval_s)
            try:
                removed = await asyncio.to_thread(self.store.cleanup)
                if removed:
                    logger.info("deleted %d expired images", removed)
            except Exception:  # noqa: BLE001 - keep cleaning next time
                logger.exception("image cleanup failed")

    def _model_statuses(self) -> dict[str, str]:
        app_name = serve.get_replica_context().app_name
        deployments = serve.status().applications[app_name].deployments
        statuses = {}
        for model in self.models.values():
            info = deployments.get(model.deployment_name)
            statuses[model.id] = str(info.status.value if info else "MISSING")
        return statuses
