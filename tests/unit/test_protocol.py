"""Request parsing, size/quality resolution, usage and error shapes (no Ray, no torch)."""

import pickle

import pytest

from serve_app.config import ModelConfig
from serve_app.protocol import (
    APIError,
    ImageGenerationRequest,
    build_images_response,
    parse_model,
    parse_size,
    resolve_generation,
    resolve_quality,
)

FLUX = ModelConfig()
TINY = ModelConfig(id="tiny", source="tiny")
MODELS = {TINY.id: TINY, FLUX.id: FLUX}


def resolve(**fields):
    return resolve_generation(ImageGenerationRequest(**{"prompt": "a cat", **fields}), MODELS, 10)


def api_error(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize(
    "size, expected",
    [
        (None, (1024, 1024)),
        ("auto", (1024, 1024)),
        ("1024x1024", (1024, 1024)),
        ("1536x1024", (1536, 1024)),
        ("1024x1536", (1024, 1536)),
        ("512x768", (512, 768)),
        ("2048x2048", (2048, 2048)),
    ],
)
def test_parse_size_accepts_auto_named_and_multiples_of_16(size, expected):
    assert parse_size(size, FLUX) == expected


@pytest.mark.parametrize(
    "size, fragment",
    [
        ("1000x1000", "multiples of 16"),
        ("128x1024", "between 256 and 2048"),
        ("4096x1024", "between 256 and 2048"),
        ("big", "WIDTHxHEIGHT"),
        ("1024x", "WIDTHxHEIGHT"),
        ("-16x16", "WIDTHxHEIGHT"),
    ],
)
def test_parse_size_rejects_with_param_and_reason(size, fragment):
    error = api_error(parse_size, size, FLUX)
    assert error.status == 400 and error.param == "size" and error.code == "invalid_value"
    assert fragment in error.message and repr(size) in error.message


def test_parse_size_enforces_max_pixels():
    model = ModelConfig(max_pixels=1024 * 1024)
    assert "exceeds the limit" in api_error(parse_size, "1536x1024", model).message


def test_tiny_model_allows_small_sizes():
    assert parse_size("64x64", TINY) == (64, 64)


@pytest.mark.parametrize(
    "quality, expected",
    [(None, "high"), ("auto", "high"), ("low", "low"), ("standard", "medium"), ("hd", "high")],
)
def test_quality_maps_to_presets(quality, expected):
    assert resolve_quality(quality, FLUX) == expected


def test_unknown_quality_is_400():
    assert api_error(resolve_quality, "ultra", FLUX).param == "quality"


def test_defaults_resolve_to_first_model_and_its_presets():
    resolved = resolve()
    assert resolved.model_id == "tiny"
    assert (resolved.width, resolved.height) == (1024, 1024)
    assert resolved.quality == "medium" and resolved.steps == TINY.quality_steps.medium
    assert resolved.guidance == TINY.default_guidance
    assert resolved.output_format == "png" and resolved.background == "opaque"
    assert resolved.n == 1 and 0 <= resolved.seed < 2**31


def test_seed_gives_consecutive_seeds_per_image():
    assert resolve(seed=7, n=3).seeds == [7, 8, 9]


def test_random_seeds_differ_between_requests():
    assert len({resolve().seed for _ in range(5)}) > 1


def test_steps_extension_overrides_quality_and_guidance_is_passed():
    resolved = resolve(model=FLUX.id, quality="low", num_inference_steps=3, guidance=7.5)
    assert resolved.steps == 3 and resolved.quality == "low" and resolved.guidance == 7.5


def test_quality_picks_model_steps():
    assert resolve(model=FLUX.id, quality="hd").steps == 28


@pytest.mark.parametrize(
    "fields, status, param, code",
    [
        ({"model": "dall-e-9"}, 404, "model", "model_not_found"),
        ({"prompt": "   "}, 400, "prompt", "invalid_value"),
        ({"n": 11}, 400, "n", "invalid_value"),
        ({"background": "transparent"}, 400, "background", "unsupported_value"),
        ({"background": "green"}, 400, "background", "invalid_value"),
        ({"response_format": "bytes"}, 400, "response_format", "invalid_value"),
        ({"output_format": "gif"}, 400, "output_format", "invalid_value"),
        ({"output_compression": 50}, 400, "output_compression", "invalid_value"),
        ({"partial_images": 2}, 400, "partial_images", "invalid_value"),
        ({"stream": True, "response_format": "url"}, 400, "response_format", "unsupported_value"),
    ],
)
def test_resolution_errors_name_the_param(fields, status, param, code):
    error = api_error(resolve, **fields)
    assert (error.status, error.param, error.code) == (status, param, code)


def test_output_compression_allowed_for_jpeg_and_webp():
    assert resolve(output_format="jpeg", output_compression=40).output_compression == 40
    assert resolve(output_format="webp").output_compression == 100


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({}, "prompt", "Missing required parameter"),
        ({"prompt": 3}, "prompt", "valid string"),
        ({"prompt": "x", "n": "two"}, "n", "valid integer"),
        ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "x", "n": 1.5}, "n", "integer"),
        ({"prompt": "x", "guidance": -1}, "guidance", "greater than or equal to 0"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "num_inference_steps": 1000}, "num_inference_steps", "less than"),
        ({"prompt": "x", "output_compression": 101}, "output_compression", "less than"),
    ],
)
def test_wrong_types_name_the_param(body, param, fragment):
    error = api_error(parse_model, ImageGenerationRequest, body)
    assert error.status == 400 and error.param == param and fragment in error.message


def test_body_must_be_an_object():
    assert api_error(parse_model, ImageGenerationRequest, [1, 2]).param is None


def test_unknown_fields_are_ignored_and_strings_coerced():
    parsed = parse_model(
        ImageGenerationRequest, {"prompt": "x", "n": "2", "style": "vivid", "moderation": "low"}
    )
    assert parsed.n == 2 and not hasattr(parsed, "style")


def test_usage_counts_text_and_image_tokens():
    resolved = resolve(size="512x256", n=3, seed=1)
    response = build_images_response(resolved, ["a", "b", "c"], text_tokens=11)
    assert response.size == "512x256"
    assert [item.seed for item in response.data] == [1, 2, 3]
    assert all(item.url is None and item.revised_prompt is None for item in response.data)
    usage = response.usage
    assert usage.output_tokens == 3 * (512 // 16) * (256 // 16)
    assert usage.input_tokens == usage.prompt_tokens == 11
    assert usage.input_tokens_details.text_tokens == 11
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.total_tokens == 11 + usage.output_tokens


def test_api_error_envelope_and_pickling():
    error = APIError("nope", status=404, param="model", code="model_not_found")
    assert error.to_body() == {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.status, copy.param, copy.code) == ("nope", 404, "model", error.code)
    assert APIError("x", status=500).type == "server_error"
