"""Size/quality/seed resolution, the job a request becomes, usage (no Ray, no torch)."""

import pytest

from serve_app.config import ModelConfig
from serve_app.protocol import ImageGenerationRequest
from serve_app.resolution import (
    build_usage,
    parse_size,
    preview_steps,
    resolve_generation,
    resolve_quality,
)
from serve_app.shapes import images_response
from tests.conftest import api_error

FLUX = ModelConfig()
TINY = ModelConfig(id="tiny", source="tiny")
MODELS = {TINY.id: TINY, FLUX.id: FLUX}


def resolve(**fields):
    return resolve_generation(ImageGenerationRequest(**{"prompt": "a cat", **fields}), MODELS, 10)


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


def test_usage_counts_text_and_image_tokens():
    resolved = resolve(size="512x256", n=3, seed=1)
    response = images_response(resolved, build_usage(resolved, 11, 0), ["a", "b", "c"])
    assert response.size == "512x256"
    assert [item.seed for item in response.data] == [1, 2, 3]
    assert all(item.url is None and item.revised_prompt is None for item in response.data)
    usage = response.usage
    assert usage.output_tokens == 3 * (512 // 16) * (256 // 16)
    assert usage.input_tokens == usage.prompt_tokens == 11
    assert usage.input_tokens_details.text_tokens == 11
    assert usage.input_tokens_details.image_tokens == 0
    assert usage.total_tokens == 11 + usage.output_tokens


def test_to_job_carries_every_resolved_field():
    resolved = resolve(size="128x64", n=2, seed=5, quality="high", output_format="webp")
    job = resolved.to_model_request("id1")
    assert (job.request_id, job.prompt, job.width, job.height) == ("id1", "a cat", 128, 64)
    assert (job.seeds, job.steps, job.guidance) == ((5, 6), 8, TINY.default_guidance)
    assert (job.output_format, job.conditioning, job.mask, job.preview_steps) == (
        "webp",
        (),
        None,
        (),
    )
    streamed = resolve(size="128x64", stream=True, partial_images=2, num_inference_steps=6)
    assert streamed.to_model_request("id2").preview_steps == preview_steps(2, 6) == (1, 3)


@pytest.mark.parametrize(
    "partial_images, steps, expected",
    [(1, 28, (13,)), (2, 28, (8, 18)), (3, 28, (6, 13, 20)), (3, 4, (0, 1, 2)), (3, 2, (0,))],
)
def test_preview_steps_are_evenly_spaced_and_never_final(partial_images, steps, expected):
    assert preview_steps(partial_images, steps) == expected
    assert preview_steps(0, 28) == () and preview_steps(2, 1) == ()
