"""Decoding uploads safely, and the geometry of conditioning: buckets, stitching, masks."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve_app.codec import decode_data_url
from serve_app.config import KONTEXT_RESOLUTIONS, ModelConfig
from serve_app.geometry import nearest_resolution
from serve_app.imageops import (
    composite,
    editable_mask,
    prepare_conditioning,
    stitch_horizontally,
)
from serve_app.uploads import UploadError, decode_upload

LIMITS = dict(max_bytes=1_000_000, max_pixels=1_000_000)


def encode(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_formats_are_sniffed_from_content(fmt):
    image = decode_upload(encode(Image.new("RGB", (40, 30), "red"), fmt), **LIMITS)
    assert image.size == (40, 30) and image.mode == "RGB"


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 100, "not a PNG"),
        (b"plain text", "not a PNG"),
        (encode(Image.new("RGB", (64, 64)))[:60], "truncated"),
    ],
)
def test_bad_bytes_are_rejected(data, fragment):
    with pytest.raises(UploadError, match=fragment) as info:
        decode_upload(data, **LIMITS)
    assert info.value.status == 400


def test_too_many_bytes_is_413():
    with pytest.raises(UploadError) as info:
        decode_upload(b"\0" * 11, max_bytes=10, max_pixels=100)
    assert info.value.status == 413


def test_pixel_limit_is_checked_before_decoding():
    bomb = encode(Image.new("L", (2000, 2000)))  # small file, 4 MP
    assert len(bomb) < 50_000
    with pytest.raises(UploadError, match="4000000 pixels"):
        decode_upload(bomb, **LIMITS)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)
    assert decode_upload(data, **LIMITS).size == (20, 40)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    image = decode_upload(encode(rgba), **LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((1, 1)) == (255, 255, 255)


def test_masks_need_alpha_and_keep_it():
    with pytest.raises(UploadError, match="alpha"):
        decode_upload(encode(Image.new("RGB", (4, 4))), as_mask=True, **LIMITS)
    mask = decode_upload(encode(Image.new("LA", (4, 4), (0, 0))), as_mask=True, **LIMITS)
    assert mask.mode == "RGBA" and mask.getpixel((0, 0))[3] == 0


def test_data_urls():
    payload = encode(Image.new("RGB", (4, 4)))
    assert decode_data_url("data:image/png;base64," + base64.b64encode(payload).decode()) == payload
    for bad, fragment in [
        ("https://example.com/a.png", "does not fetch"),
        ("data:image/png,rawbytes", "base64-encoded"),
        ("data:image/png;base64,@@@", "invalid"),
    ]:
        with pytest.raises(UploadError, match=fragment):
            decode_data_url(bad)


def test_nearest_resolution_matches_kontexts_choice():
    buckets = ModelConfig().resolution_buckets
    assert len(buckets) == len(KONTEXT_RESOLUTIONS)
    assert nearest_resolution(1000, 1000, buckets) == (1024, 1024)
    assert nearest_resolution(1920, 1080, buckets) == (1392, 752)
    assert nearest_resolution(100, 1000, buckets) == (672, 1568)


def test_tiny_buckets_keep_kontext_aspects_at_a_quarter_area():
    tiny = ModelConfig(id="t", source="tiny").resolution_buckets
    for (w, h), (tw, th) in zip(ModelConfig().resolution_buckets, tiny, strict=True):
        assert tw % 16 == 0 and th % 16 == 0
        assert abs(tw / th - w / h) < 0.1 and abs(tw * th * 4 / (w * h) - 1) < 0.1


def test_stitching_places_references_side_by_side_at_the_first_height():
    a, b = Image.new("RGB", (30, 20), "red"), Image.new("RGB", (10, 40), "blue")
    canvas = stitch_horizontally([a, b])
    assert canvas.size == (35, 20)
    assert canvas.getpixel((0, 0)) == (255, 0, 0) and canvas.getpixel((34, 10)) == (0, 0, 255)
    assert stitch_horizontally([a]) is a


def test_openai_mask_semantics_and_exact_composite():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[1:3, 1:3, 3] = 0  # transparent = editable
    mask = editable_mask(Image.fromarray(rgba, "RGBA"))
    assert np.array_equal(np.asarray(mask) == 255, rgba[..., 3] == 0)
    original = Image.new("RGB", (4, 4), (10, 20, 30))
    generated = Image.new("RGB", (4, 4), (200, 200, 200))
    out = np.asarray(composite(generated, original, mask))
    assert (out[0, 0] == (10, 20, 30)).all() and (out[1, 1] == (200, 200, 200)).all()


def test_prepare_conditioning_sizes():
    buckets = [(64, 64), (128, 64)]
    image = Image.new("RGB", (50, 50))
    plain = prepare_conditioning([image], None, (96, 96), buckets)
    assert plain.canvas.size == (64, 64) and plain.mask is None and plain.init_image is None
    two = prepare_conditioning([image, image], None, (96, 96), buckets)
    assert two.canvas.size == (128, 64)
    mask = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    masked = prepare_conditioning([image], mask, (96, 96), buckets)
    assert masked.init_image.size == masked.mask.size == (96, 96)
    assert np.asarray(masked.mask).min() == 255
