"""Body readers: wire-model validation errors name the field (no Ray, no torch)."""

import pytest

from serve_app.http.bodies import parse_model
from serve_app.protocol import ImageGenerationRequest
from tests.conftest import api_error


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({}, "prompt", "Missing required parameter"),
        ({"prompt": 3}, "prompt", "valid string"),
        ({"prompt": "x", "n": "two"}, "n", "must be an integer"),
        ({"prompt": "x", "n": "2"}, "n", "must be an integer"),
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


def test_unknown_fields_are_ignored_and_form_text_is_parsed():
    parsed = parse_model(
        ImageGenerationRequest, {"prompt": "x", "n": 2, "style": "vivid", "moderation": "low"}
    )
    assert parsed.n == 2 and not hasattr(parsed, "style")
    form = parse_model(
        ImageGenerationRequest,
        {"prompt": "x", "n": "2", "guidance": "3.5", "stream": "true", "seed": " 7 "},
        form=True,
    )
    assert (form.n, form.guidance, form.stream, form.seed) == (2, 3.5, True, 7)
