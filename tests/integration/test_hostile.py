"""Hostile inputs on the running app: every image mode converts correctly, and worst-case uploads
keep the ingress's memory bounded and hand it back."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from PIL import Image

from serve_app.bench.load import serve_processes
from tests.conftest import pixels
from tests.integration.conftest import APP_NAME, TEST_LIMITS

SIZE = 64
RNG = np.random.default_rng(0)
GREY16 = RNG.integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
GREY = RNG.integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
ALPHA = RNG.integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
RGB = RNG.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)


def encode(image: Image.Image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def over_white(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(values.astype(np.float64) * a + 255 * (1 - a))


def grey_rgb(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def cmyk_jpeg():
    data = encode(Image.fromarray(RGB, "RGB").convert("CMYK"), "JPEG", quality=95)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # Pillow's CMYK -> RGB
    return data, expected, 0


def palette_with_transparency():
    image = Image.fromarray(RGB, "RGB").quantize(16)
    image.info["transparency"] = 0
    expected = np.asarray(image.convert("RGBA"))
    return encode(image, transparency=0), over_white(expected[..., :3], expected[..., 3]), 1


MODES = {
    # mode: (file bytes, expected RGB pixels, tolerance per channel)
    "I;16": lambda: (
        encode(Image.fromarray(GREY16)),
        grey_rgb(np.rint(GREY16 / 257)),
        0,
    ),
    "1": lambda: (
        encode(Image.fromarray(GREY > 127)),
        grey_rgb(np.where(GREY > 127, 255, 0)),
        0,
    ),
    "L": lambda: (encode(Image.fromarray(GREY, "L")), grey_rgb(GREY), 0),
    "LA": lambda: (
        encode(Image.fromarray(np.dstack([GREY, ALPHA]), "LA")),
        grey_rgb(over_white(GREY[..., None], ALPHA)[..., 0]),
        1,
    ),
    "RGB": lambda: (encode(Image.fromarray(RGB, "RGB")), RGB, 0),
    "RGBA": lambda: (
        encode(Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA")),
        over_white(RGB, ALPHA),
        1,
    ),
    "P+transparency": palette_with_transparency,
    "CMYK (JPEG)": cmyk_jpeg,
    "RGB (WebP)": lambda: (encode(Image.fromarray(RGB, "RGB"), "WEBP", lossless=True), RGB, 0),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_round_trips_through_an_edit_with_an_opaque_mask(client, mode):
    """With nothing editable, the edit returns the input exactly as the model saw it."""
    data, expected, tolerance = MODES[mode]()
    opaque = encode(Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255)))
    result = client.images.edit(
        image=("in", data, "application/octet-stream"),
        mask=("mask.png", opaque, "image/png"),
        prompt="keep everything",
    )
    out = pixels(result.data[0].b64_json)
    assert out.shape == (SIZE, SIZE, 3)
    difference = np.abs(out - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= tolerance, (mode, difference.max())


def ingress_pid() -> int:
    [pid] = [
        pid
        for pid, actor in serve_processes().items()
        if actor == f"ServeReplica:{APP_NAME}:ImagesIngress"
    ]
    return pid


def test_worst_case_uploads_keep_ingress_memory_bounded_and_hand_it_back(http):
    """Six concurrent edits of four solid 2000x2000 RGBA PNGs (16 MP each to decode; about 20 KB
    each to send). The decoding budget lets two decode at once; peak and settled RSS of the
    ingress are checked against the bound documented in docs/operations.md."""
    side = 2000
    upload = encode(Image.new("RGBA", (side, side), (200, 30, 30, 255)))
    assert len(upload) < TEST_LIMITS["max_image_bytes"]
    process = psutil.Process(ingress_pid())
    baseline = process.memory_info().rss
    peak, done = [baseline], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(process.memory_info().rss)
            time.sleep(0.01)

    def edit(i):
        files = [("image[]", (f"{k}.png", upload, "image/png")) for k in range(4)]
        return http.post(
            "/v1/images/edits", files=files, data={"prompt": "x", "num_inference_steps": "1"}
        )

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(edit, range(6)))
    finally:
        done.set()
        sampler.join()
    assert [r.status_code for r in responses] == [200] * 6, [r.text[:200] for r in responses]
    budget_bytes = 12 * TEST_LIMITS["max_decoding_pixels"]  # documented: ~12 bytes per pixel
    growth = max(peak) - baseline
    assert growth < budget_bytes, f"peak grew {growth / 2**20:.0f} MiB"
    time.sleep(1)
    settled = process.memory_info().rss - baseline
    print(f"ingress RSS: peak +{growth / 2**20:.0f} MiB, settled +{settled / 2**20:.0f} MiB")
    assert settled < 64 * 2**20, f"still {settled / 2**20:.0f} MiB above the baseline"
