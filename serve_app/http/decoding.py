"""Input images of one request: probed, budgeted, decoded, with bounded memory.

Uploads are small to send but can be huge to decode (a 160 KB PNG of one colour decodes to
7000x7000 pixels). So: every upload is probed first (no pixels decoded); a request may decode at
most `limits.max_input_pixels_per_request`; and the ingress process decodes at most
`limits.max_decoding_pixels` at once (`PixelBudget`): a request beyond that waits up to
`limits.decode_wait_s`, then gets a 503 with `Retry-After`. Decoded images are shrunk to the
model's largest side at once, and memory is handed back after each large decode.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from PIL import Image

from serve_app import memory
from serve_app.config import UploadLimits
from serve_app.contract import APIError
from serve_app.http.bodies import ImageUploads, Upload
from serve_app.uploads import ProbedUpload, UploadError, decode_probed, probe_upload

TRIM_AFTER_PIXELS = 4_000_000  # decodes at least this big hand memory back afterwards


class PixelBudget:
    """How many pixels this process may be decoding at once, shared by all requests."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        return self._changed

    @asynccontextmanager
    async def reserve(self, pixels: int, wait_s: float) -> AsyncIterator[None]:
        """Hold `pixels` of the budget; 503 with Retry-After when it is not free within
        `wait_s`."""
        changed = self._condition()
        async with changed:
            try:
                await asyncio.wait_for(
                    changed.wait_for(lambda: self.in_use + pixels <= self.capacity), wait_s
                )
            except TimeoutError:
                raise APIError(
                    "The server is decoding too many large images right now; retry shortly.",
                    status=503,
                    code="server_busy",
                    headers={"Retry-After": "2"},
                ) from None
            self.in_use += pixels
        try:
            yield
        finally:
            async with changed:
                self.in_use -= pixels
                changed.notify_all()


@dataclass
class DecodedInputs:
    """Images (RGB) and mask (RGBA or None), shrunk to the model's largest side; `size` is the
    first image's size as sent (what `size=auto` and the mask check go by)."""

    images: list[Image.Image]
    mask: Image.Image | None
    size: tuple[int, int]

    @property
    def masked(self) -> bool:
        return self.mask is not None


@contextmanager
def _naming(param: str) -> Iterator[None]:
    """An upload's problem becomes a 400 (or 413) naming the field it came in."""
    try:
        yield
    except UploadError as exc:
        raise APIError(
            f"Invalid image in {param!r}: {exc}.", status=exc.status, param=param
        ) from None


def _probe(upload: Upload, limits: UploadLimits, max_side: int) -> ProbedUpload:
    param, data = upload
    with _naming(param):
        return probe_upload(
            data,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_input_pixels,
            max_side=max_side,
        )


def _decode(probed: ProbedUpload, param: str, max_side: int, as_mask: bool) -> Image.Image:
    with _naming(param):
        return decode_probed(probed, max_side=max_side, as_mask=as_mask)


def probe_all(
    uploads: ImageUploads, limits: UploadLimits, max_side: int
) -> list[tuple[str, ProbedUpload]]:
    """Probe every upload (images, then the mask) and check the request's pixel budget."""
    if not uploads.images:
        raise APIError("Missing required parameter: 'image'.", param="image")
    if len(uploads.images) > limits.max_input_images:
        raise APIError(
            f"{len(uploads.images)} images sent; at most {limits.max_input_images} are accepted.",
            param=uploads.images[0][0],
        )
    everything = uploads.images + ([uploads.mask] if uploads.mask else [])
    probed = [(param, _probe((param, data), limits, max_side)) for param, data in everything]
    total = sum(p.decoded_pixels for _, p in probed)
    if total > limits.max_input_pixels_per_request:
        raise APIError(
            f"The input images decode to {total} pixels in all; one request may send at most "
            f"{limits.max_input_pixels_per_request} (the model conditions on about 1 MP, so "
            "scale large inputs down before sending).",
            param=uploads.images[0][0],
        )
    if uploads.mask:
        mask_size, image_size = probed[-1][1].size, probed[0][1].size
        if mask_size != image_size:
            raise APIError(
                f"The mask is {mask_size[0]}x{mask_size[1]} but the image is "
                f"{image_size[0]}x{image_size[1]}; they must match.",
                param="mask",
            )
    return probed


def decode_all(
    probed: list[tuple[str, ProbedUpload]], has_mask: bool, max_side: int
) -> DecodedInputs:
    """Decode probed uploads (the last one is the mask when `has_mask`); runs in a thread."""
    decoded = []
    try:
        for i, (param, p) in enumerate(probed):
            decoded.append(_decode(p, param, max_side, as_mask=has_mask and i == len(probed) - 1))
            p.image.close()  # the full-size pixels go as soon as the converted copy exists
    finally:
        for _, p in probed:
            p.image.close()
        if sum(p.decoded_pixels for _, p in probed) >= TRIM_AFTER_PIXELS:
            memory.trim()
    mask = decoded.pop() if has_mask else None
    return DecodedInputs(images=decoded, mask=mask, size=probed[0][1].size)
