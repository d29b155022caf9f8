"""Codecs are pure: encode to each format, decode back, base64 round trip."""

import numpy as np
import pytest
from PIL import Image

from serve_app.codec import encode_image, to_base64
from tests.conftest import decode_base64_image, decode_image


@pytest.fixture
def noise():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt, pil_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_format_decodes_with_size(noise, fmt, pil_name):
    decoded = decode_image(encode_image(noise, fmt))
    assert decoded.format == pil_name and decoded.size == (80, 48)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_png_and_best_webp_are_lossless(noise, fmt):
    decoded = decode_image(encode_image(noise, fmt, 100)).convert("RGB")
    assert np.array_equal(np.asarray(decoded), np.asarray(noise))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_compression_trades_size(noise, fmt):
    assert len(encode_image(noise, fmt, 10)) < len(encode_image(noise, fmt, 90))


def test_rgba_is_flattened_for_jpeg():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert decode_image(encode_image(rgba, "jpeg")).mode == "RGB"


def test_base64_round_trip(noise):
    back = decode_base64_image(to_base64(encode_image(noise)))
    assert np.array_equal(np.asarray(back), np.asarray(noise))


def test_unknown_format_raises(noise):
    with pytest.raises(ValueError):
        encode_image(noise, "gif")


def test_corrupt_bytes_raise():
    with pytest.raises(Exception):  # noqa: B017 - PIL raises several types
        decode_image(b"\x89PNG\r\n\x1a\n not really")
