"""The real app on Ray (CPU, tiny model), driven by the stock openai SDK and raw HTTP."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.geometry import parse_wxh
from tests.conftest import assert_batch_equivalent, pixels

MODEL = "flux-kontext-tiny"


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def post(http, body, **kwargs):
    return http.post("/v1/images/generations", json=body, **kwargs)


def assert_envelope(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_sdk_generates_n_images_of_the_requested_size(client):
    result = client.images.generate(prompt="a red cat", n=2, size="256x256", model=MODEL)
    assert len(result.data) == 2
    for item in result.data:
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (256, 256)
        assert item.url is None and item.revised_prompt is None
    assert result.data[1].seed == result.data[0].seed + 1
    assert (result.size, result.output_format, result.background, result.quality) == (
        "256x256",
        "png",
        "opaque",
        "medium",
    )
    usage = result.usage
    assert usage.input_tokens > 0 and usage.input_tokens_details.text_tokens == usage.input_tokens
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.output_tokens == 2 * 16 * 16
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.model_extra["prompt_tokens"] == usage.input_tokens
    assert result.created > 0


def test_default_model_and_auto_size(client):
    result = client.images.generate(prompt="a cat", size="auto", quality="low")
    assert decode(result.data[0].b64_json).size == (1024, 1024)
    assert result.size == "1024x1024" and result.quality == "low"


@pytest.mark.parametrize("size", ["1536x1024", "1024x1536", "320x192"])
def test_non_square_sizes_are_exact(client, size):
    result = client.images.generate(prompt="a cat", size=size, quality="low")
    width, height = parse_wxh(size)
    assert decode(result.data[0].b64_json).size == (width, height)
    assert result.size == size


@pytest.mark.parametrize("fmt, pil_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_decode(client, fmt, pil_name):
    result = client.images.generate(
        prompt="a cat", size="128x128", output_format=fmt, output_compression=None
    )
    assert decode(result.data[0].b64_json).format == pil_name
    assert result.output_format == fmt


def test_output_compression_changes_jpeg(client):
    sizes = [
        len(
            client.images.generate(
                prompt="a cat",
                size="256x256",
                output_format="jpeg",
                output_compression=level,
                extra_body={"seed": 1},
            )
            .data[0]
            .b64_json
        )
        for level in (5, 95)
    ]
    assert sizes[0] < sizes[1]


def test_quality_aliases_and_steps_extension(client):
    assert client.images.generate(prompt="x", size="64x64", quality="hd").quality == "high"
    assert client.images.generate(prompt="x", size="64x64", quality="standard").quality == "medium"
    fewer = client.images.generate(
        prompt="x", size="64x64", extra_body={"seed": 3, "num_inference_steps": 1}
    )
    more = client.images.generate(
        prompt="x", size="64x64", extra_body={"seed": 3, "num_inference_steps": 6}
    )
    assert not np.array_equal(pixels(fewer.data[0].b64_json), pixels(more.data[0].b64_json))


@pytest.mark.parametrize(
    "kwargs, exc_type, param, code",
    [
        ({"size": "100x100"}, openai.BadRequestError, "size", "invalid_value"),
        ({"size": "4096x4096"}, openai.BadRequestError, "size", "invalid_value"),
        ({"model": "dall-e-3"}, openai.NotFoundError, "model", "model_not_found"),
        ({"n": 11}, openai.BadRequestError, "n", "invalid_value"),
        ({"background": "transparent"}, openai.BadRequestError, "background", "unsupported_value"),
        ({"response_format": "link"}, openai.BadRequestError, "response_format", None),
        ({"quality": "ultra"}, openai.BadRequestError, "quality", "invalid_value"),
        ({"prompt": "cat " * 600}, openai.BadRequestError, "prompt", "context_length_exceeded"),
    ],
)
def test_sdk_errors_carry_param_and_code(client, kwargs, exc_type, param, code):
    args = {"prompt": "a cat", "size": "64x64", **kwargs}
    with pytest.raises(exc_type) as info:
        client.images.generate(**args)
    assert info.value.param == param
    if code:
        assert info.value.code == code
    assert info.value.body["message"]


def test_long_prompt_error_states_count_and_limit(http):
    error = assert_envelope(post(http, {"prompt": "cat " * 600}), 400, "prompt")
    assert "512" in error["message"] and "tokens" in error["message"]


@pytest.mark.parametrize(
    "content, status, param",
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"n": 1}', 400, "prompt"),
        (b'{"prompt": 5}', 400, "prompt"),
        (b'{"prompt": "x", "n": "many"}', 400, "n"),
        (b'{"prompt": "x", "guidance": "strong"}', 400, "guidance"),
        (b'{"prompt": "x", "seed": 1.5}', 400, "seed"),
    ],
)
def test_malformed_bodies_get_envelopes(http, content, status, param):
    response = http.post(
        "/v1/images/generations", content=content, headers={"content-type": "application/json"}
    )
    assert_envelope(response, status, param)


def test_unknown_route_and_method_get_envelopes(http):
    assert_envelope(http.get("/v1/nothing-here"), 404, code="not_found")
    assert_envelope(http.get("/v1/images/generations"), 405, code="method_not_allowed")


def test_unknown_fields_are_ignored(http):
    response = post(http, {"prompt": "x", "size": "64x64", "style": "vivid", "moderation": "low"})
    assert response.status_code == 200, response.text


def test_request_id_is_echoed(http):
    response = post(http, {"prompt": "x", "size": "64x64"}, headers={"x-request-id": "abc123"})
    assert response.headers["x-request-id"] == "abc123"
    error = post(http, {"prompt": ""}, headers={"x-request-id": "bad1"})
    assert error.headers["x-request-id"] == "bad1"


def test_models_and_health(http, client):
    # The model, then its LoRA adapters (test_lora.py): `<model>:<adapter>`.
    assert [m.id for m in client.models.list() if ":" not in m.id] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert_envelope(http.get("/v1/models/nope"), 404, "model", "model_not_found")
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["models"] == {MODEL: {"status": "HEALTHY", "running_replicas": 1}}


def generate_alone(http, seed, n=1, size="128x128", prompt="a lighthouse"):
    body = {"prompt": prompt, "size": size, "n": n, "seed": seed}
    response = post(http, body)
    assert response.status_code == 200, response.text
    return response


def test_same_seed_alone_is_byte_identical(http):
    first = generate_alone(http, 42).json()["data"][0]
    second = generate_alone(http, 42).json()["data"][0]
    assert first["seed"] == second["seed"] == 42
    assert first["b64_json"] == second["b64_json"]
    third = generate_alone(http, 43).json()["data"][0]
    assert third["b64_json"] != first["b64_json"]


def test_concurrent_requests_batch_and_match_unbatched(http):
    """Requests sent together run as one batch; each image equals its unbatched twin."""
    alone = {
        seed: pixels(generate_alone(http, seed).json()["data"][0]["b64_json"]) for seed in (7, 8)
    }
    bodies = [
        {"prompt": "a lighthouse", "size": "128x128", "seed": 7},
        {"prompt": "a lighthouse", "size": "128x128", "seed": 8},
        {"prompt": "a forest", "size": "128x128", "seed": 1, "n": 2},
        {"prompt": "a lighthouse", "size": "128x128", "seed": 100, "n": 1},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(http, body), bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    batch_sizes = [int(r.headers["x-batch-images"]) for r in responses]
    assert max(batch_sizes) >= 2, f"nothing was batched: {batch_sizes}"
    for response, seed in zip(responses[:2], (7, 8), strict=True):
        assert_batch_equivalent(pixels(response.json()["data"][0]["b64_json"]), alone[seed])


def test_n_larger_than_a_batch_is_split_and_keeps_seeds(http):
    """n=10 exceeds max_batch_images=8: the request is split, each image keeps seed + i."""
    response = generate_alone(http, 500, n=10, size="64x64")
    data = response.json()["data"]
    assert [item["seed"] for item in data] == list(range(500, 510))
    assert len(response.headers["x-batch-images"].split(",")) == 2
    last_alone = generate_alone(http, 509, size="64x64").json()["data"][0]
    assert_batch_equivalent(pixels(data[-1]["b64_json"]), pixels(last_alone["b64_json"]))
    assert len({item["b64_json"] for item in data}) == 10
