"""The ingress's error path and import hygiene, without Ray running."""

import asyncio
import json
import subprocess
import sys

import pytest
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


class PendingResponse:
    """A model request that never finishes on its own, like a `DeploymentResponse`."""

    def __init__(self) -> None:
        self.cancelled = False
        self._done = asyncio.Event()

    def __await__(self):
        return self._done.wait().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class PendingHandle:
    def __init__(self) -> None:
        self.responses: list[PendingResponse] = []
        self.generate = self.check_request = self

    def options(self, **_):
        return self

    def remote(self, *_):
        self.responses.append(PendingResponse())
        return self.responses[-1]


def test_a_model_request_whose_caller_times_out_is_cancelled_in_the_model():
    """`wait_for` cancels the awaiting coroutine; the model's request must be cancelled too,
    or the replica keeps working on an answer nobody reads."""
    from serve_app.model_client import RayModelClient
    from tests.conftest import make_job

    handle = PendingHandle()
    client = RayModelClient(handle)

    async def timed_out() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.generate(make_job()), 0.05)

    asyncio.run(timed_out())
    assert [r.cancelled for r in handle.responses] == [True]


def test_the_ingress_deployment_options():
    from serve_app.config import AppArgs
    from serve_app.ingress import ImagesIngress

    assert ImagesIngress.deployment_options(AppArgs(access_log=False)) == {
        "name": "ImagesIngress",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 256,
        "logging_config": {"enable_access_log": False},
    }
    options = ImagesIngress.deployment_options(AppArgs(access_log=True))
    assert options["logging_config"] == {"enable_access_log": True}


@pytest.mark.parametrize("jobs", [True, False])
@pytest.mark.parametrize("playground", [True, False])
def test_the_ingress_serves_the_route_table(tmp_path, jobs, playground):
    """Every table route whose feature is on, in table order, its handler resolved by name."""
    from serve_app.config import AppArgs
    from serve_app.ingress import ImagesIngress
    from serve_app.routes import ROUTES

    args = AppArgs(
        storage={"local_dir": str(tmp_path)}, jobs={"enabled": jobs}, playground=playground
    )
    ingress = ImagesIngress(args.model_dump(), {})
    on = {"jobs"} if jobs else set()
    on |= {"playground"} if playground else set()
    expected = [route for route in ROUTES if route.feature is None or route.feature in on]
    served = ingress.routes()
    assert [route for route, _ in served] == expected
    for route, handler in served:
        owner, name = route.handler.split(".")
        assert handler == getattr(getattr(ingress, owner), name)
    app = ingress.__serve_build_asgi_app__()
    assert [(r.path, r.methods - {"HEAD"}) for r in app.routes] == [
        (route.path, set(route.methods)) for route in expected
    ]
