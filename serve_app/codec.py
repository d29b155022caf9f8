"""Pure image codecs: PIL image -> PNG/JPEG/WebP bytes -> base64, and back. No Ray, no torch."""

from __future__ import annotations

import base64
import io

from PIL import Image

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image.Image, output_format: str = "png", compression: int = 100) -> bytes:
    """Encode one image. `compression` is OpenAI's 0-100 quality knob for jpeg/webp.

    PNG is lossless and ignores it (compress_level 1: speed over a few percent of size). WebP at
    100 is encoded lossless, so the best quality really is exact.
    """
    if output_format not in PIL_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}")
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=max(1, min(compression, 95)))
    elif compression >= 100:
        image.save(buffer, format="WEBP", lossless=True)
    else:
        image.save(buffer, format="WEBP", quality=compression)
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- uploads -------------------------------------------------------------------------------------

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")


class UploadError(ValueError):
    """An uploaded image that cannot be used; `status` is 400 or 413."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int, as_mask: bool = False):
    """Decode an uploaded PNG/JPEG/WebP safely: size and pixel limits first, then pixels.

    The format is sniffed from the bytes (never the filename). The pixel count is checked from the
    header before any pixel is decoded, so a decompression bomb costs nothing. EXIF orientation is
    applied. Images get transparency composited onto white (RGB); masks (`as_mask`) must have an
    alpha channel and come back RGBA.
    """
    from PIL import ImageOps, UnidentifiedImageError

    if not data:
        raise UploadError("the file is empty")
    if len(data) > max_bytes:
        raise UploadError(f"the file is {len(data)} bytes; the limit is {max_bytes} bytes", 413)
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise UploadError("the file is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise UploadError(f"the image has more than {max_pixels} pixels") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadError(
            f"the image is {width}x{height} ({width * height} pixels); the limit is {max_pixels}"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(f"the image is corrupt or truncated ({exc})") from None
    if as_mask:
        if not has_alpha(image):
            raise UploadError(
                "the mask has no alpha channel; fully transparent pixels (alpha 0) mark the "
                "area to edit"
            )
        return image.convert("RGBA")
    return flatten_alpha(image)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )


def flatten_alpha(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB with any transparency composited onto an opaque background."""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


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
