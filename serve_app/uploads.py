"""Decoding uploaded images safely, in two steps, so memory is known before it is spent.

1. `probe_upload`: sniff the format from the bytes (never the filename), read the header, refuse
   animations, pick the decoded size (JPEGs decode reduced, straight to about the largest side
   the model uses) and check its pixels, all before any pixel is decoded.
2. `decode_probed`: decode, apply EXIF orientation, convert every mode Pillow opens to RGB (or
   RGBA for masks) with correct scaling (16-bit grey is scaled, not clipped), and shrink to fit
   the model's largest side.

Any decoder failure, whatever Pillow raises, is an `UploadError` (a 400 naming the field). Pure
Pillow/numpy; no Ray, no torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
# EXIF orientation -> the transpose that undoes it (5-8 swap width and height).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class UploadError(ValueError):
    """An uploaded image that cannot be used; `status` is 400 or 413."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ProbedUpload:
    """An opened, not yet decoded, upload."""

    image: Image.Image
    size: tuple[int, int]  # as the client sees it: after EXIF orientation, before any reduction
    orientation: int = 1  # EXIF orientation, applied when decoding

    @property
    def decoded_pixels(self) -> int:
        """Pixels the decoder will produce (JPEG: after draft reduction)."""
        return self.image.size[0] * self.image.size[1]


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` scaled down (aspect kept) so neither side exceeds `max_side`."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def probe_upload(data: bytes, *, max_bytes: int, max_pixels: int, max_side: int) -> ProbedUpload:
    """Open an upload and check it, decoding no pixels; see the module docstring."""
    if not data:
        raise UploadError("the file is empty")
    if len(data) > max_bytes:
        raise UploadError(f"the file is {len(data)} bytes; the limit is {max_bytes} bytes", 413)
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        orientation = _orientation(image)
    except UnidentifiedImageError:
        raise UploadError("the file is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise UploadError(f"the image has more than {max_pixels} pixels") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        raise UploadError(f"the image could not be read ({type(exc).__name__}: {exc})") from None
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise UploadError(
            f"animated images are not supported (this one has {frames} frames); send a single frame"
        )
    width, height = image.size
    if image.format == "JPEG":
        image.draft(None, fit_within((width, height), max_side))  # decode reduced (1/2 .. 1/8)
    decoded = image.size[0] * image.size[1]
    if decoded > max_pixels:
        raise UploadError(
            f"the image is {width}x{height} ({decoded} pixels to decode); the limit is {max_pixels}"
        )
    size = (height, width) if orientation in _TRANSPOSES and orientation >= 5 else (width, height)
    return ProbedUpload(image=image, size=size, orientation=orientation)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation, read without decoding pixels. (Pillow's `getexif` decodes a whole PNG
    to look for a late eXIf chunk; here only one before the pixels counts, for PNG.)"""
    if image.format == "PNG":
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1)
    return image.getexif().get(0x0112, 1)


def decode_probed(probed: ProbedUpload, *, max_side: int, as_mask: bool = False) -> Image.Image:
    """Pixels of a probed upload: RGB (transparency on white), or RGBA for a mask, at most
    `max_side` on each side."""
    try:
        probed.image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's fault
        probed.image.close()
        raise UploadError(f"the image is corrupt or truncated ({type(exc).__name__})") from None
    image = probed.image  # the caller closes it once the converted copy below exists
    if probed.orientation in _TRANSPOSES:
        image = image.transpose(_TRANSPOSES[probed.orientation])
        probed.image.close()
    if as_mask:
        if not has_alpha(image):
            raise UploadError(
                "the mask has no alpha channel; fully transparent pixels (alpha 0) mark the "
                "area to edit"
            )
        image = to_8_bit(image).convert("RGBA")
        resample = Image.Resampling.NEAREST  # keep alpha 0 exactly where it was
    else:
        image = flatten_alpha(to_8_bit(image))
        resample = Image.Resampling.LANCZOS
    target = fit_within(probed.size, max_side)
    return image if image.size == target else image.resize(target, resample)


def to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer greyscale scaled to 8 bits (Pillow's convert clips them to 255)."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def flatten_alpha(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB with any transparency composited onto an opaque background (in place on one RGB
    canvas: large images must not be copied more often than needed)."""
    if not has_alpha(image):
        return image.convert("RGB")
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    alpha = rgba.getchannel("A")
    if alpha.getextrema() == (255, 255):
        return rgba.convert("RGB")
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=alpha)
    return canvas


def decode_upload(
    data: bytes, *, max_bytes: int, max_pixels: int, max_side: int = 2048, as_mask: bool = False
) -> Image.Image:
    """Probe then decode one upload (for callers that need no memory budget)."""
    probed = probe_upload(data, max_bytes=max_bytes, max_pixels=max_pixels, max_side=max_side)
    try:
        return decode_probed(probed, max_side=max_side, as_mask=as_mask)
    finally:
        probed.image.close()
