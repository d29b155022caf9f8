"""Pure image codecs: PIL image -> PNG/JPEG/WebP bytes -> base64, and `data:` URLs -> bytes.
No Ray, no torch (decoding uploads safely is `serve_app.uploads`)."""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from serve_app.provenance import Provenance, save_params
from serve_app.uploads import UploadError

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(
    image: Image.Image,
    output_format: str = "png",
    compression: int = 100,
    provenance: Provenance | None = None,
) -> bytes:
    """Encode one image. `compression` is OpenAI's 0-100 quality knob for jpeg/webp.

    PNG is lossless and ignores it (compress_level 1: speed over a few percent of size). WebP at
    100 is encoded lossless, so the best quality really is exact. `provenance` adds the XMP and
    EXIF marks (`serve_app.provenance`); without it the bytes are exactly as before. Either way
    the same image gives the same bytes.
    """
    if output_format not in PIL_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    marks: dict[str, Any] = save_params(provenance, output_format) if provenance else {}
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=1, **marks)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=max(1, min(compression, 95)), **marks)
    elif compression >= 100:
        image.save(buffer, format="WEBP", lossless=True, **marks)
    else:
        image.save(buffer, format="WEBP", quality=compression, **marks)
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_data_url(url: str) -> bytes:
    """Bytes of a `data:image/...;base64,` URL; anything else is refused (we never fetch URLs)."""
    if not url.startswith("data:"):
        raise UploadError(
            "only data: URLs (data:image/png;base64,...) are accepted; this server does not "
            "fetch remote URLs"
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise UploadError("the data URL must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise UploadError("the data URL's base64 payload is invalid") from None
