"""Geometry of input images: resolution buckets, reference stitching, masks, compositing.

Pure PIL/numpy, no torch: the ingress prepares conditioning here, so jobs reach the batch queue
with their final tensor shapes (which is what decides which jobs can share a pipeline call).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from serve_app.geometry import nearest_resolution


def stitch_horizontally(images: list[Image.Image], height: int | None = None) -> Image.Image:
    """Several references side by side at one height (default: the first image's): one Kontext
    conditioning canvas.

    FLUX Kontext conditions on one image; placing references on one canvas is the established way
    to give it several (the model sees them all and can move content between them).
    """
    height = height or images[0].height
    if len(images) == 1 and images[0].height == height:
        return images[0]
    widths = _widths_at(images, height)
    canvas = Image.new("RGB", (sum(widths), height), (255, 255, 255))
    x = 0
    for image, width in zip(images, widths, strict=True):
        canvas.paste(fit(image, (width, height)), (x, 0))
        x += width
    return canvas


def _widths_at(images: list[Image.Image], height: int) -> list[int]:
    return [
        im.width if im.height == height else max(1, round(im.width * height / im.height))
        for im in images
    ]


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly `size` (no-op when already there)."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def editable_mask(mask_rgba: Image.Image) -> Image.Image:
    """OpenAI mask -> diffusers mask: fully transparent (alpha 0) = editable = white (255)."""
    alpha = np.asarray(mask_rgba.getchannel("A"))
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep the original's pixels wherever the mask (255 = editable) does not allow edits.

    A VAE round trip alters every pixel slightly; compositing afterwards makes the unmasked region
    exactly the input.
    """
    keep = np.asarray(mask) == 0
    out = np.asarray(generated.convert("RGB")).copy()
    out[keep] = np.asarray(original.convert("RGB"))[keep]
    return Image.fromarray(out)


@dataclass
class Conditioning:
    """Inputs of an edit at their final sizes: the Kontext canvas, and for masked edits the image
    to inpaint and the editable mask (255), both at the output size."""

    canvas: Image.Image
    init_image: Image.Image | None = None
    mask: Image.Image | None = None


def prepare_conditioning(
    images: list[Image.Image],
    mask_rgba: Image.Image | None,
    output_size: tuple[int, int],
    buckets: list[tuple[int, int]],
) -> Conditioning:
    """Stitch the references, resize the canvas to its nearest bucket; prepare a masked edit."""
    # The canvas's bucket follows from the images' aspect ratios alone; stitching straight at
    # the bucket's height (when smaller) keeps large inputs from building a huge canvas.
    first_height = images[0].height
    bucket = nearest_resolution(sum(_widths_at(images, first_height)), first_height, buckets)
    canvas = stitch_horizontally(images, min(first_height, bucket[1]))
    canvas = fit(canvas, bucket)
    if mask_rgba is None:
        return Conditioning(canvas)
    mask = editable_mask(mask_rgba)
    if mask.size != output_size:
        mask = mask.resize(output_size, Image.Resampling.NEAREST)
    return Conditioning(canvas, fit(images[0], output_size), mask)
