"""HTTP-only answers: the stream's server-sent events and images behind signed links.

The bodies themselves (images response, stream events) are shaped in `serve_app.shapes`, which
has no Starlette, so job objects and webhooks build exactly the same ones.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from serve_app.protocol import CompletedImageEvent, ErrorResponse, PartialImageEvent
from serve_app.storage import ImageStore


def sse(event: PartialImageEvent | CompletedImageEvent | ErrorResponse) -> str:
    """A server-sent event as OpenAI sends them: `event:` line, `data:` JSON line, blank line.
    An error's event type is `error` (its data is the usual error envelope)."""
    event_type = getattr(event, "type", "error")
    return f"event: {event_type}\ndata: {event.model_dump_json()}\n\n"


async def signed_file(store: ImageStore, request: Request) -> Response:
    """An image behind a link this server signed (`name`, `expires`, `signature`)."""
    data, media_type = await asyncio.to_thread(
        store.read,
        request.path_params["name"],
        request.query_params.get("expires"),
        request.query_params.get("signature"),
    )
    return Response(data, media_type=media_type, headers={"Cache-Control": "private"})
