"""What crosses between deployments survives pickling (Ray's transport) with every field."""

import pickle

from PIL import Image

from serve_app.contract import (
    Accepted,
    APIError,
    Completed,
    GenerationResult,
    ModelRequest,
    PartialImage,
)
from serve_app.http.errors import error_response


def roundtrip(value):
    return pickle.loads(pickle.dumps(value))


def test_api_errors_keep_every_field_and_headers_across_processes():
    error = APIError("slow down", status=429, param="n", code="busy", headers={"Retry-After": "7"})
    copy = roundtrip(error)
    assert (copy.message, copy.status, copy.param, copy.code, copy.type) == (
        "slow down",
        429,
        "n",
        "busy",
        "rate_limit_error",
    )
    assert copy.headers == {"Retry-After": "7"}
    response = error_response(copy)  # what the ingress answers for an error a replica raised
    assert response.status_code == 429 and response.headers["retry-after"] == "7"


def test_default_types_and_codes():
    assert APIError("x", status=500).type == "server_error"
    assert APIError("x", status=401).type == "authentication_error"
    assert APIError("x", param="size").code == "invalid_value"
    assert APIError("x").code is None


def test_jobs_and_events_pickle_with_their_images():
    canvas = Image.new("RGB", (32, 16), "red")
    job = ModelRequest("r", "a cat", 64, 32, 4, 2.5, (1, 2), conditioning=(canvas,))
    copy = roundtrip(job)
    assert copy == job and copy.conditioning[0].tobytes() == canvas.tobytes()
    result = GenerationResult(images=[b"png"], text_tokens=3, batch_sizes=[1])
    events = [Accepted(3), PartialImage(1, 0, b"jpg"), Completed(result)]
    assert [roundtrip(event) for event in events] == events
