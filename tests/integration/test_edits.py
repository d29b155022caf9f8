"""Edits, variations and url responses on the real app, through the stock SDK and raw HTTP."""

import base64
import hashlib
import hmac
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.geometry import image_tokens, nearest_resolution
from tests.conftest import assert_batch_equivalent, pixels
from tests.integration.conftest import TEST_LIMITS, URL_SECRET

TINY = ModelConfig(id="flux-kontext-tiny", source="tiny")


def noise_png(width=128, height=128, seed=0, mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def center_mask(width=128, height=128) -> tuple[bytes, np.ndarray]:
    """An OpenAI mask: opaque everywhere except a transparent (editable) center square."""
    alpha = np.full((height, width), 255, np.uint8)
    alpha[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 0
    rgba = np.dstack([np.zeros((height, width, 3), np.uint8), alpha])
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue(), alpha == 0


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_file(data: bytes, name="image.png"):
    return (name, data, "image/png")


def edit_raw(http, files, data=None):
    return http.post("/v1/images/edits", files=files, data={"prompt": "x", **(data or {})})


def assert_error(response, status, param=None, fragment=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if fragment:
        assert fragment in error["message"], error["message"]
    return error


# --- edits -------------------------------------------------------------------------------------


def test_edit_one_image_auto_size_keeps_aspect_at_preferred_area(client):
    source = noise_png(200, 100)
    result = client.images.edit(
        image=png_file(source), prompt="make it blue", model=TINY.id, extra_body={"seed": 1}
    )
    expected = nearest_resolution(200, 100, TINY.resolution_buckets)
    image = decode(result.data[0].b64_json)
    assert image.size == expected and result.size == f"{expected[0]}x{expected[1]}"
    usage = result.usage
    assert usage.input_tokens_details.image_tokens == image_tokens(*expected)
    assert usage.input_tokens == usage.input_tokens_details.text_tokens + image_tokens(*expected)


def test_edit_explicit_size_is_exact_and_input_matters(client):
    def edit(seed_image):
        return client.images.edit(
            image=png_file(noise_png(96, 96, seed=seed_image)),
            prompt="make it blue",
            size="192x128",
            extra_body={"seed": 5},
        )

    first, second = edit(0), edit(1)
    assert decode(first.data[0].b64_json).size == (192, 128)
    # Same prompt and seed, different input image: the image conditions the result.
    assert not np.array_equal(pixels(first.data[0].b64_json), pixels(second.data[0].b64_json))


def test_edit_with_two_images_conditions_on_both(client):
    one, two = noise_png(96, 96, seed=0), noise_png(96, 96, seed=1)
    kwargs = dict(prompt="put the hat from image 2 on image 1", size="128x128")
    both = client.images.edit(
        image=[png_file(one, "a.png"), png_file(two, "b.png")], extra_body={"seed": 3}, **kwargs
    )
    other = client.images.edit(
        image=[png_file(one, "a.png"), png_file(noise_png(96, 96, seed=2), "c.png")],
        extra_body={"seed": 3},
        **kwargs,
    )
    alone = client.images.edit(image=png_file(one), extra_body={"seed": 3}, **kwargs)
    # The stitched 192x96 canvas has aspect 2: its bucket, not the square one, is in the usage.
    stitched = nearest_resolution(192, 96, TINY.resolution_buckets)
    assert both.usage.input_tokens_details.image_tokens == image_tokens(*stitched)
    assert alone.usage.input_tokens_details.image_tokens == image_tokens(
        *nearest_resolution(96, 96, TINY.resolution_buckets)
    )
    # Changing only the second image changes the result: it conditions the output.
    assert not np.array_equal(pixels(both.data[0].b64_json), pixels(other.data[0].b64_json))


def test_masked_edit_changes_only_the_transparent_region(client):
    source = noise_png(128, 128, seed=4)
    mask, editable = center_mask()
    result = client.images.edit(
        image=png_file(source), mask=png_file(mask, "mask.png"), prompt="a hole", n=2
    )
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    for item in result.data:
        out = np.asarray(decode(item.b64_json).convert("RGB"))
        assert out.shape == original.shape  # auto size keeps a valid input size
        assert np.array_equal(out[~editable], original[~editable])
        assert (out[editable] != original[editable]).mean() > 0.5


def test_masked_edit_at_explicit_size_keeps_the_resized_input(client):
    source = noise_png(128, 128, seed=4)
    mask, editable = center_mask()
    result = client.images.edit(
        image=png_file(source), mask=png_file(mask, "mask.png"), prompt="x", size="64x64"
    )
    out = np.asarray(decode(result.data[0].b64_json).convert("RGB"))
    resized = np.asarray(
        Image.open(io.BytesIO(source)).convert("RGB").resize((64, 64), Image.LANCZOS)
    )
    keep = ~editable[::2, ::2]
    assert out.shape == (64, 64, 3) and np.array_equal(out[keep], resized[keep])


def test_json_edit_form_with_data_urls(http):
    data_url = "data:image/png;base64," + base64.b64encode(noise_png(64, 64)).decode()
    mask, editable = center_mask(64, 64)
    body = {
        "prompt": "x",
        "size": "64x64",
        "images": [{"image_url": data_url}],
        "mask": {"image_url": "data:image/png;base64," + base64.b64encode(mask).decode()},
    }
    response = http.post("/v1/images/edits", json=body)
    assert response.status_code == 200, response.text
    out = pixels(response.json()["data"][0]["b64_json"])
    original = np.asarray(Image.open(io.BytesIO(noise_png(64, 64))).convert("RGB"))
    assert np.array_equal(out[~editable], original[~editable])


def test_exif_orientation_is_applied(client):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 128x64 landscape file displays as 64x128 portrait
    Image.new("RGB", (128, 64), (200, 10, 10)).save(buffer, format="JPEG", exif=exif)
    result = client.images.edit(image=("photo.jpg", buffer.getvalue(), "image/jpeg"), prompt="x")
    width, height = decode(result.data[0].b64_json).size
    assert (width, height) == nearest_resolution(64, 128, TINY.resolution_buckets)
    assert height > width


def test_concurrent_edits_batch_and_match_unbatched(http):
    def body(seed):
        return {
            "images": [
                {
                    "image_url": "data:image/png;base64,"
                    + base64.b64encode(noise_png(64, 64)).decode()
                }
            ],
            "prompt": "x",
            "size": "64x64",
            "seed": seed,
        }

    alone = http.post("/v1/images/edits", json=body(21)).json()["data"][0]["b64_json"]
    with ThreadPoolExecutor(3) as pool:
        responses = list(
            pool.map(lambda s: http.post("/v1/images/edits", json=body(s)), (21, 22, 23))
        )
    assert all(r.status_code == 200 for r in responses)
    assert max(int(r.headers["x-batch-images"]) for r in responses) >= 2
    assert_batch_equivalent(pixels(responses[0].json()["data"][0]["b64_json"]), pixels(alone))


# --- variations --------------------------------------------------------------------------------


def test_variations_give_n_different_images(client):
    result = client.images.create_variation(image=png_file(noise_png(128, 96)), n=3, model=TINY.id)
    expected = nearest_resolution(128, 96, TINY.resolution_buckets)
    arrays = [pixels(item.b64_json) for item in result.data]
    assert len(arrays) == 3 and all(a.shape[1::-1] == expected for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 3
    assert len({item.seed for item in result.data}) == 3
    assert result.usage.input_tokens_details.image_tokens == image_tokens(*expected)


def test_variations_accept_size_and_extensions(client):
    result = client.images.create_variation(
        image=png_file(noise_png(64, 64)),
        size="256x256",
        extra_body={"seed": 9, "quality": "low", "output_format": "webp"},
    )
    image = decode(result.data[0].b64_json)
    assert image.size == (256, 256) and image.format == "WEBP"
    assert result.data[0].seed == 9 and result.quality == "low"


# --- url responses -----------------------------------------------------------------------------


def download(url: str) -> httpx.Response:
    return httpx.get(url, timeout=30)


def test_url_responses_on_every_endpoint(client):
    results = [
        client.images.generate(prompt="x", size="64x64", response_format="url"),
        client.images.edit(
            image=png_file(noise_png(64, 64)), prompt="x", size="64x64", response_format="url"
        ),
        client.images.create_variation(
            image=png_file(noise_png(64, 64)), size="64x64", response_format="url"
        ),
    ]
    for result in results:
        [item] = result.data
        assert item.b64_json is None and item.url.startswith("http://127.0.0.1:")
        response = download(item.url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (64, 64)


def test_url_image_equals_b64_image(client):
    kwargs = dict(prompt="x", size="64x64", output_format="webp", extra_body={"seed": 77})
    by_url = client.images.generate(response_format="url", **kwargs).data[0].url
    by_b64 = client.images.generate(response_format="b64_json", **kwargs).data[0].b64_json
    assert download(by_url).content == base64.b64decode(by_b64)


def test_forged_and_expired_links_are_refused(client):
    url = client.images.generate(prompt="x", size="64x64", response_format="url").data[0].url
    base, query = url.split("?")
    name = base.rsplit("/", 1)[1]
    params = dict(pair.split("=") for pair in query.split("&"))
    forged = f"{base}?expires={int(params['expires']) + 3600}&signature={params['signature']}"
    assert_error(download(forged), 403)
    assert_error(download(base), 403)
    past = int(time.time()) - 10
    signature = hmac.new(URL_SECRET.encode(), f"{name}:{past}".encode(), hashlib.sha256).hexdigest()
    assert_error(download(f"{base}?expires={past}&signature={signature}"), 404)
    assert_error(download(base.rsplit("/", 1)[0] + "/../etc.png?expires=1&signature=x"), 404)


# --- bad input ---------------------------------------------------------------------------------


def truncated_png() -> bytes:
    return noise_png(64, 64)[:300]


def bomb_png() -> bytes:
    """A 3000x3000 single-colour PNG: a few KB that decode to 9 MP (limit in tests: 4 MP)."""
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "files, status, param, fragment",
    [
        ({"image": ("a.png", b"", "image/png")}, 400, "image", "empty"),
        ({"image": ("a.png", b"hello, not an image", "image/png")}, 400, "image", "not a PNG"),
        ({"image": ("a.png", truncated_png(), "image/png")}, 400, "image", "truncated"),
        ({"image": ("a.gif", b"GIF89a" + b"\0" * 64, "image/gif")}, 400, "image", "not a PNG"),
        ({"image": ("a.png", bomb_png(), "image/png")}, 400, "image", "limit"),
        (
            {"image": ("a.png", b"\x89PNG" + b"\0" * (TEST_LIMITS["max_image_bytes"] + 1))},
            413,
            "image",
            "limit",
        ),
        ({"image[]": ("a.png", b"", "image/png")}, 400, "image[]", "empty"),
        ({"photo": ("a.png", noise_png(64, 64), "image/png")}, 400, "photo", "Unexpected file"),
    ],
)
def test_bad_uploads_name_the_field(http, files, status, param, fragment):
    assert_error(edit_raw(http, files), status, param, fragment)


def test_bad_mask_uploads(http):
    image = ("a.png", noise_png(64, 64), "image/png")
    wrong_size, _ = center_mask(32, 32)
    no_alpha = noise_png(64, 64)
    for mask, fragment in [(wrong_size, "must match"), (no_alpha, "alpha"), (b"junk", "not a PNG")]:
        response = edit_raw(http, {"image": image, "mask": ("m.png", mask, "image/png")})
        assert_error(response, 400, "mask", fragment)


def test_request_level_edit_errors(http):
    image = ("a.png", noise_png(64, 64), "image/png")
    assert_error(http.post("/v1/images/edits", data={"prompt": "x"}), 415)
    assert_error(http.post("/v1/images/edits", files={"x": ("x.png", b"1")}, data={}), 400, "x")
    assert_error(edit_raw(http, [("image", image)] * 5), 400, "image", "at most 4")
    missing_prompt = http.post("/v1/images/edits", files={"image": image})
    assert_error(missing_prompt, 400, "prompt")
    assert_error(edit_raw(http, {"image": image}, {"n": "lots"}), 400, "n")
    assert_error(edit_raw(http, {"image": image}, {"size": "100x100"}), 400, "size")


@pytest.mark.parametrize(
    "images, param, fragment",
    [
        ([{"image_url": "https://example.com/cat.png"}], "images[0].image_url", "does not fetch"),
        ([{"file_id": "file-123"}], "images[0].image_url", "file_id"),
        ([{"image_url": "data:image/png;base64,@@@"}], "images[0].image_url", "base64"),
        ([], "image", "Missing"),
        ("not a list", "images", None),
    ],
)
def test_json_edit_errors(http, images, param, fragment):
    response = http.post("/v1/images/edits", json={"prompt": "x", "images": images})
    assert_error(response, 400, param, fragment)


def test_variation_errors(http):
    image = ("a.png", noise_png(64, 64), "image/png")
    assert_error(http.post("/v1/images/variations", json={"image": "x"}), 415)
    two = [("image", image), ("image", image)]
    assert_error(http.post("/v1/images/variations", files=two), 400, "image", "exactly one")
    assert_error(http.post("/v1/images/variations", files={"mask": image}), 400, "mask")
    assert_error(http.post("/v1/images/variations", files={"n": (None, "1")}), 400, "image")


def test_sdk_raises_typed_errors_for_bad_uploads(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("a.png", b"nope", "image/png"), prompt="x")
    assert info.value.param == "image"
