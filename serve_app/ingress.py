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
from ray.serve.exceptions import BackPressureError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.batching import ImageJob
from serve_app.codec import to_base64
from serve_app.config import AppArgs
from serve_app.protocol import (
    APIError,
    ImageGenerationRequest,
    ModelCard,
    ModelList,
    build_images_response,
    parse_model,
    resolve_generation,
)

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
Handler = Callable[[Request], Awaitable[Response]]


def error_response(exc: Exception, request_id: str | None = None) -> JSONResponse:
    """Turn any exception into OpenAI's error envelope; unknown ones are a logged, opaque 500."""
    if isinstance(exc, APIError):
        error = exc
    elif isinstance(exc, HTTPException):
        error = _http_exception_to_api_error(exc)
    elif isinstance(exc, BackPressureError):
        error = APIError(
            "The server is at capacity; retry shortly.",
            status=429,
            code="server_overloaded",
            headers={"Retry-After": "1"},
        )
    else:
        logger.error("request %s failed", request_id, exc_info=exc)
        error = APIError(
            f"The server had an error while processing the request (request id {request_id}).",
            status=500,
            code="internal_error",
        )
    return JSONResponse(error.to_body(), status_code=error.status, headers=error.headers)


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


async def read_json(request: Request) -> object:
    body = await request.body()
    if not body:
        raise APIError("The request body is empty; send a JSON object.")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"The request body is not valid JSON: {exc}.") from None


class ImagesIngress:
    """The HTTP front door; `model_handles` maps model id -> model deployment handle."""

    def __init__(self, args: dict, model_handles: dict) -> None:
        self.args = AppArgs.model_validate(args)
        self.models = {model.id: model for model in self.args.models}
        self.handles = model_handles
        self.created = int(time.time())

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            Route("/v1/images/generations", self._wrap(self.create_generation), methods=["POST"]),
            Route("/v1/models", self._wrap(self.list_models), methods=["GET"]),
            Route("/v1/models/{model:path}", self._wrap(self.get_model), methods=["GET"]),
            Route("/health", self._wrap(self.health), methods=["GET"]),
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            return error_response(exc, current_request_id(request))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    @staticmethod
    def _wrap(handler: Handler) -> Handler:
        """Tag the request with its id and route every failure through `error_response`."""

        async def endpoint(request: Request) -> Response:
            request.state.request_id = current_request_id(request)
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - the one place errors become envelopes
                return error_response(_unwrap_remote_error(exc), request.state.request_id)

        return endpoint

    async def create_generation(self, request: Request) -> Response:
        parsed = parse_model(ImageGenerationRequest, await read_json(request))
        resolved = resolve_generation(parsed, self.models, self.args.max_n)
        request_id = request.state.request_id
        logger.info(
            "generation %s model=%s n=%d size=%s steps=%d user=%s",
            request_id,
            resolved.model_id,
            resolved.n,
            resolved.size,
            resolved.steps,
            parsed.user,
        )
        job = ImageJob.from_resolved(request_id, resolved)
        result = await self.handles[resolved.model_id].generate.remote(job)
        body = build_images_response(
            resolved, [to_base64(image) for image in result.images], result.text_tokens
        )
        headers = {"x-batch-images": ",".join(str(size) for size in result.batch_sizes)}
        return JSONResponse(body.model_dump(), headers=headers)

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

    async def health(self, request: Request) -> Response:
        """200 once every model deployment reports healthy to the Serve controller."""
        statuses = await asyncio.to_thread(self._model_statuses)
        unhealthy = {name: status for name, status in statuses.items() if status != "HEALTHY"}
        if unhealthy:
            raise APIError(
                f"Model deployments not ready: {unhealthy}.", status=503, code="not_ready"
            )
        return JSONResponse({"status": "ok", "models": statuses})

    def _model_statuses(self) -> dict[str, str]:
        app_name = serve.get_replica_context().app_name
        deployments = serve.status().applications[app_name].deployments
        statuses = {}
        for model in self.models.values():
            info = deployments.get(model.deployment_name)
            statuses[model.id] = str(info.status.value if info else "MISSING")
        return statuses
