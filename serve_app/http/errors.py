"""The one error path: every exception becomes OpenAI's error envelope here.

Domain errors (`contract.APIError`) keep their status, param, code and headers; Ray's own
failures map to the documented 503 / 429 / 504; anything else is a logged, opaque 500.
"""

from __future__ import annotations

import logging

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from serve_app.contract import APIError
from serve_app.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("ray.serve")
# Messages quote client values cut short (`protocol.shown`); this bounds any that slipped through.
MAX_MESSAGE_CHARS = 2000


# Failures of the serving machinery: what the client is told, and whether to retry.
_KNOWN_FAILURES = (
    (
        (RayActorError, ActorUnavailableError),
        "The model replica serving this request failed; it is being replaced. Retry shortly.",
        503,
        "model_unavailable",
        True,
    ),
    (
        BackPressureError,
        "The server is at capacity; retry shortly.",
        429,
        "server_overloaded",
        True,
    ),
    (
        TimeoutError,
        "The request took longer than the server's time limit and was cancelled.",
        504,
        "timeout",
        False,
    ),
)


def unwrap_remote_error(exc: BaseException) -> BaseException:
    """Ray wraps replica exceptions; an APIError raised in a replica should reach the client."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, APIError):
        return exc
    if isinstance(cause, APIError):
        return cause
    return exc


def as_api_error(exc: BaseException, request_id: str | None = None) -> APIError:
    """The client-facing error for any exception (logging the unexpected ones)."""
    exc = unwrap_remote_error(exc)
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, HTTPException):
        return _http_exception_to_api_error(exc)
    for types, message, status, code, retry in _KNOWN_FAILURES:
        if isinstance(exc, types):
            if status == 503:
                logger.warning("request %s lost its model replica: %s", request_id, exc)
            headers = {"Retry-After": "1"} if retry else None
            return APIError(message, status=status, code=code, headers=headers)
    logger.error("request %s failed", request_id, exc_info=exc)
    return APIError(
        "The server had an error while processing the request.", status=500, code="internal_error"
    )


def error_body(error: APIError, request_id: str | None = None) -> ErrorResponse:
    """The envelope; the request id ends the message so users can quote it."""
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    message = f"{message} (request id {request_id})" if request_id else message
    info = ErrorInfo(message=message, type=error.type, param=error.param, code=error.code)
    return ErrorResponse(error=info)


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """Turn any exception into OpenAI's error envelope; unknown ones are a logged, opaque 500."""
    error = as_api_error(exc, request_id)
    body = error_body(error, request_id).model_dump()
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
