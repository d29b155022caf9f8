"""The browser playground: a static page (`serve_app/playground/`) served at `/` and
`/playground`. It holds no secrets, so it is served without a key; its requests to `/v1/...` carry
the key the user types. `playground: false` in the app args turns it off."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from serve_app.contract import APIError
from serve_app.protocol import shown

ASSETS = Path(__file__).resolve().parent.parent / "playground"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only this server: no CDN, no inline script; images arrive as data: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class PlaygroundRoutes:
    def __init__(self) -> None:
        self.files = {
            path.name: (path.read_bytes(), MEDIA_TYPES[path.suffix])
            for path in ASSETS.iterdir()
            if path.suffix in MEDIA_TYPES
        }

    def _file(self, name: str) -> Response:
        if name not in self.files:
            raise APIError(f"No playground file {shown(name)}.", status=404, code="not_found")
        data, media_type = self.files[name]
        return Response(data, media_type=media_type, headers=SECURITY_HEADERS)

    async def page(self, request: Request) -> Response:
        return self._file("index.html")

    async def asset(self, request: Request) -> Response:
        return self._file(request.path_params["name"])
