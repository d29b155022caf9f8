"""`limits.request_timeout_s` stops the model's work, not only the answer: a second app with a
3-second limit on its own model replica (so the session app's model is not held up)."""

import copy
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

TIMEOUT_S = 3
# Minutes of work for the tiny model on a 2-core machine: far past the time limit.
HUGE = {"prompt": "a huge fox", "size": "512x512", "n": 4, "num_inference_steps": 100, "seed": 1}
SMALL = {"prompt": "a small fox", "size": "64x64", "quality": "low", "seed": 2}


@pytest.fixture
def timeouts_app(serve_config, redeploy):
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    limited = copy.deepcopy(app)
    limited["name"], limited["route_prefix"] = "timeouts", "/timeouts"
    limited["args"]["limits"] = {**limited["args"]["limits"], "request_timeout_s": TIMEOUT_S}
    limited["args"]["jobs"] = {"enabled": False}
    limited["args"]["models"][0].pop("lora", None)
    config["applications"].append(limited)
    redeploy(config)
    from ray import serve

    deadline = time.monotonic() + 120
    while (status := serve.status().applications.get("timeouts")) is None or (
        status.status != "RUNNING"
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    port = config["http_options"]["port"]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/timeouts", timeout=120) as http:
            yield http
    finally:
        redeploy(serve_config)


@pytest.mark.parametrize("stream", [False, True])
def test_a_timed_out_request_frees_the_model_for_the_next(timeouts_app, stream):
    http = timeouts_app
    assert http.post("/v1/images/generations", json=SMALL).status_code == 200  # warm
    started = time.monotonic()
    answer = http.post("/v1/images/generations", json={**HUGE, "stream": stream})
    if stream:  # the time limit ends the stream with an error event
        assert answer.status_code == 200
        assert '"code":"timeout"' in answer.text.replace(" ", ""), answer.text[-500:]
    else:
        assert answer.status_code == 504, answer.text
        assert answer.json()["error"]["code"] == "timeout"
    timed_out = time.monotonic() - started
    assert timed_out < TIMEOUT_S + 5, f"answered after {timed_out:.1f}s"
    # The huge call is stopped at its next denoising step, so the next request runs at once
    # (without the cancellation it would wait minutes behind the abandoned call).
    started = time.monotonic()
    answer = http.post("/v1/images/generations", json=SMALL)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started < TIMEOUT_S, "the model was still busy with the huge call"
