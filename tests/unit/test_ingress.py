"""The ingress's error path and import hygiene, without Ray running."""

import json
import subprocess
import sys

from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from serve_app.contract import APIError
from serve_app.http.errors import error_response, unwrap_remote_error


def body(response):
    return json.loads(response.body)


def test_unexpected_exceptions_become_opaque_500s():
    response = error_response(RuntimeError("secret path /root/weights leaked"), "req-1")
    assert response.status_code == 500
    error = body(response)["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "secret" not in error["message"] and "req-1" in error["message"]


def test_api_errors_keep_status_param_and_headers():
    error = APIError("slow down", status=429, headers={"Retry-After": "3"})
    response = error_response(error)
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert body(response)["error"]["type"] == "rate_limit_error"


def test_backpressure_is_a_429_with_retry_after():
    response = error_response(BackPressureError(num_queued_requests=5, max_queued_requests=4))
    assert response.status_code == 429 and response.headers["retry-after"] == "1"


def test_starlette_http_errors_use_the_envelope():
    assert body(error_response(HTTPException(404)))["error"]["code"] == "not_found"
    response = error_response(HTTPException(405, headers={"Allow": "POST"}))
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_remote_api_errors_are_unwrapped():
    inner = APIError("too long", param="prompt")

    class Wrapped(Exception):
        cause = inner

    assert unwrap_remote_error(Wrapped()) is inner
    other = ValueError("x")
    assert unwrap_remote_error(other) is other


def test_ingress_and_app_builder_do_not_import_torch():
    code = "import sys, serve_app.app, serve_app.ingress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
