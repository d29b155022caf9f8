"""With random weights, wiring is proven by sensitivity: every input the client sends changes the
output, and the same request twice gives the same bytes (through the stock SDK)."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import decode_base64_image
from tests.integration.test_edits import noise_png, png_file

BASE = {
    "prompt": "put the hat from image 2 on image 1",
    "image_seeds": (0, 1),
    "seed": 3,
    "guidance": 2.5,
    "steps": 3,
}


def editable_mask(margin: int, size: int = 96) -> bytes:
    """Transparent (editable) everywhere but a `margin`-pixel opaque border."""
    alpha = np.full((size, size), 255, np.uint8)
    alpha[margin : size - margin, margin : size - margin] = 0
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((size, size, 3), np.uint8), alpha]), "RGBA").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def edit(client, mask_margin=None, **changes):
    request = {**BASE, **changes}
    images = [
        png_file(noise_png(96, 96, seed=s), f"{i}.png")
        for i, s in enumerate(request["image_seeds"])
    ]
    extra = {"mask": png_file(editable_mask(mask_margin), "mask.png")} if mask_margin else {}
    result = client.images.edit(
        image=images if len(images) > 1 else images[0],
        prompt=request["prompt"],
        size="96x96",
        extra_body={
            "seed": request["seed"],
            "guidance": request["guidance"],
            "num_inference_steps": request["steps"],
        },
        **extra,
    )
    return result.data[0].b64_json


@pytest.fixture(scope="module")
def base(client):
    return edit(client)


def test_the_same_request_twice_gives_the_same_bytes(client, base):
    assert edit(client) == base


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a red umbrella in the rain"},
        {"image_seeds": (5, 1)},  # the first image of image[]
        {"image_seeds": (0, 6)},  # the second image of image[]
        {"guidance": 6.0},
        {"steps": 4},
        {"seed": 4},
    ],
    ids=["prompt", "image-0", "image-1", "guidance", "steps", "seed"],
)
def test_each_input_changes_the_output(client, base, change):
    assert edit(client, **change) != base


def test_the_mask_reaches_the_model_not_only_the_composite(client):
    """Pixels editable under both masks still differ: the inpaint pipeline saw the mask."""
    small = np.asarray(decode_base64_image(edit(client, mask_margin=32, image_seeds=(0,))))
    large = np.asarray(decode_base64_image(edit(client, mask_margin=8, image_seeds=(0,))))
    common = (slice(32, 64), slice(32, 64))
    assert not np.array_equal(small[common], large[common])
