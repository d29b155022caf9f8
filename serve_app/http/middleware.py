"""Every route's frame: request id, API key, time limit, error envelope, metrics, one log line.

`RequestFrame.wrap(handler, route)` turns an endpoint `async (Request) -> Response` into the route
Starlette calls; `route` is its entry in `serve_app.routes.ROUTES`, which says whether it needs a
key. Handlers raise; only this frame (through `errors.error_response`) answers with an
error. Streams are logged when their headers go; their own events carry later errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from serve_app.auth import FailedAuthThrottle, KeyStore
from serve_app.http.errors import error_response, unwrap_remote_error
from serve_app.metrics import IngressMetrics
from serve_app.routes import RouteSpec

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the answer
LOG_TEXT_CHARS = 256  # the most of any one client-supplied string a log line repeats
Handler = Callable[[Request], Awaitable[Response]]


def current_request_id(request: Request) -> str:
    """Ray Serve's request id (the `x-request-id` header, else generated). A client's id that is
    too long or has characters beyond `[A-Za-z0-9._:-]` is replaced, not repeated in messages
    and logs (Ray Serve's proxy still echoes the header it received, as it always does)."""
    try:
        from ray.serve.context import _get_serve_request_context

        request_id = _get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - private API; fall back to our own id
        request_id = None
    request_id = request_id or request.headers.get(REQUEST_ID_HEADER)
    if request_id and _USABLE_ID.fullmatch(request_id):
        return request_id
    return uuid.uuid4().hex


def needs_key(route: RouteSpec) -> bool:
    """The route table's `access`: the API (`/v1/...`) is keyed; signed image links carry their
    own authorisation; `/health`, `/openapi.json` and the playground are open so load balancers,
    tools and browsers can read them. A path no route matches (404) or a method a route does not
    have (405) is answered by Starlette's router before any frame, without a key."""
    return route.access == "keyed"


class RequestFrame:
    """Wraps endpoints; `summary` fields a handler puts on `request.state` join the log line."""

    def __init__(self, keys: KeyStore | None, timeout_s: float, metrics: IngressMetrics) -> None:
        self.keys = keys
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.throttle = FailedAuthThrottle()

    def wrap(self, handler: Handler, route: RouteSpec) -> Handler:
        keyed = needs_key(route)
        template = route.path  # metrics and logs name the template, never the raw path

        async def endpoint(request: Request) -> Response:
            started = time.monotonic()
            state = request.state
            state.request_id = current_request_id(request)
            state.key_name, state.summary = "-", {}
            try:
                if self.keys is not None and keyed:
                    client = request.client.host if request.client else "-"
                    authorization = request.headers.get("authorization")
                    state.key_name = self.throttle.check(self.keys, authorization, client)
                state.deadline = started + self.timeout_s
                response = await asyncio.wait_for(handler(request), self.timeout_s)
            except ClientDisconnect:
                # Gone mid-upload: nobody to answer; count it as the client's doing, not ours.
                state.summary["client_closed"] = True
                response = Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as exc:  # noqa: BLE001 - the one place errors become envelopes
                error = unwrap_remote_error(exc)
                self._count_rejection(error)
                response = error_response(error, state.request_id)
            self._record(request, template, response.status_code, time.monotonic() - started)
            return response

        return endpoint

    def _count_rejection(self, exc: BaseException) -> None:
        status = getattr(exc, "status", None)
        if status == 401:
            self.metrics.rejected.inc(tags={"reason": "auth"})
        elif getattr(exc, "code", None) in ("too_many_uploads", "body_timeout"):
            self.metrics.rejected.inc(tags={"reason": "slow_upload"})
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
        except Exception:  # metrics must never break a response (logged)
            logger.exception("could not record metrics for request %s", state.request_id)
        line = {
            "id": state.request_id,
            "endpoint": route,
            "path": request.url.path,
            "key": state.key_name,
            **state.summary,
            "status": status,
            "seconds": round(seconds, 4),
        }
        line = {name: _loggable(value) for name, value in line.items()}
        logger.info("request_done %s", json.dumps(line))


def _loggable(value: object) -> object:
    """Text a client chose (path, `user`, ...) cut to `LOG_TEXT_CHARS`: a cheap request must
    not write a huge log line."""
    if isinstance(value, str) and len(value) > LOG_TEXT_CHARS:
        return value[:LOG_TEXT_CHARS] + "..."
    return value
