"""HTTP hardening (third round), without Ray: slow bodies, deeply nested `lora` form text, a
huge `user`, malformed job ids and client values echoed in errors and logs."""

import asyncio
import json
import logging
import time

import pytest
from starlette.testclient import TestClient

from serve_app.config import UploadLimits
from serve_app.contract import APIError
from serve_app.http.bodies import BodyGuard, UploadSlots, parse_model
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest
from serve_app.resolution import resolve_generation
from tests.unit.conftest import MODEL, ingress_for

HUGE = 900_000


class Trickle:
    """An ASGI `receive` whose body arrives one chunk every `every_s` seconds."""

    def __init__(self, chunks: int, every_s: float) -> None:
        self.left, self.every_s = chunks, every_s

    async def __call__(self):
        await asyncio.sleep(self.every_s)
        self.left -= 1
        return {"type": "http.request", "body": b"x", "more_body": self.left > 0}


async def read_all(guard: BodyGuard) -> int:
    chunks = 0
    while True:
        message = await guard()
        chunks += 1
        if not message.get("more_body"):
            return chunks


def test_a_trickled_body_is_cut_at_the_body_deadline_with_408():
    limits = UploadLimits(body_timeout_s=0.3, max_uploads_per_client=4)
    guard = BodyGuard(Trickle(100, 0.05), "1.2.3.4", limits, UploadSlots())
    started = time.monotonic()
    with pytest.raises(APIError) as caught:
        asyncio.run(read_all(guard))
    assert 0.3 <= time.monotonic() - started < 1.0
    error = caught.value
    assert (error.status, error.code) == (408, "body_timeout")
    assert error.headers["Connection"] == "close"


def test_slow_bodies_past_the_per_client_cap_get_429_and_slots_come_back(monkeypatch):
    monkeypatch.setattr("serve_app.http.bodies.SLOW_BODY_S", 0.1)
    limits = UploadLimits(body_timeout_s=5, max_uploads_per_client=2)
    slots = UploadSlots()

    async def attack():
        guards = [BodyGuard(Trickle(10, 0.05), "1.2.3.4", limits, slots) for _ in range(5)]
        other = BodyGuard(Trickle(10, 0.05), "5.6.7.8", limits, slots)  # another address
        return await asyncio.gather(
            *(read_all(g) for g in [*guards, other]), return_exceptions=True
        )

    results = asyncio.run(attack())
    refused = [r for r in results[:5] if isinstance(r, APIError)]
    assert [r for r in results[:5] if r == 10] and len(refused) == 3
    assert all((r.status, r.code) == (429, "too_many_uploads") for r in refused)
    assert all(r.headers["Retry-After"] for r in refused)
    assert results[5] == 10  # the cap is per address
    assert not slots.active  # every slot was given back


def test_a_fast_body_takes_no_upload_slot():
    slots = UploadSlots()
    limits = UploadLimits(max_uploads_per_client=1)
    assert asyncio.run(read_all(BodyGuard(Trickle(3, 0), "1.2.3.4", limits, slots))) == 3
    assert not slots.active


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_lora_form_text_is_a_400_not_a_500(depth):
    fields = {"prompt": "p", "lora": "[" * depth + "]" * depth}
    with pytest.raises(APIError) as caught:
        parse_model(ImageEditRequest, fields, form=True)
    assert caught.value.status == 400 and caught.value.param == "lora"
    assert "nested too deeply" in caught.value.message


def test_deeply_nested_lora_form_field_over_http_is_a_400(app):
    depth = 100_000
    response = app.post(
        "/v1/images/edits",
        data={"prompt": "p", "lora": "[" * depth + "]" * depth},
        files={"image": ("a.png", b"\x89PNG not really", "image/png")},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora"


def test_a_long_user_is_refused_naming_user():
    with pytest.raises(APIError) as caught:
        parse_model(ImageGenerationRequest, {"prompt": "p", "user": "u" * 257})
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "user", "invalid_value")
    assert len(error.message) < 400
    assert parse_model(ImageGenerationRequest, {"prompt": "p", "user": "u" * 256}).user


def test_request_log_lines_cut_client_strings(app, caplog):
    caplog.set_level(logging.INFO, logger="ray.serve")
    long_path = "/v1/models/" + "m" * 20_000
    not_found = app.get(long_path)
    assert not_found.status_code == 404
    assert len(not_found.json()["error"]["message"]) < 2200  # every message is bounded
    app.post("/v1/images/generations", json={"prompt": "p", "user": "u" * 256, "size": "64x64"})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request_done")]
    assert len(lines) == 2 and all(len(line) < 1500 for line in lines)
    first = json.loads(lines[0].removeprefix("request_done "))
    assert first["path"].startswith("/v1/models/mmm") and first["path"].endswith("...")


@pytest.mark.parametrize("field", ["model", "size", "quality", "background", "output_format"])
def test_error_messages_cut_echoed_values(app, field):
    response = app.post("/v1/images/generations", json={"prompt": "p", field: "z" * HUGE})
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert error["param"] == field and "zzz" in error["message"]
    assert len(error["message"]) < 500


def test_resolution_echoes_at_most_a_short_quote():
    from serve_app.config import ModelConfig

    models = {MODEL: ModelConfig(id=MODEL, source="tiny")}
    request = ImageGenerationRequest(prompt="p", model=MODEL + ":" + "a" * HUGE)
    with pytest.raises(APIError) as caught:
        resolve_generation(request, models, 4)
    assert caught.value.status == 404 and len(caught.value.message) < 500


@pytest.mark.parametrize(
    "job_id", ["imgjob_0123456789abcdef01234567:payload", "imgjob_x", "x" * 5000]
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_malformed_job_ids_are_404_without_touching_redis(fake, app_args, job_id, method):
    ingress = ingress_for(app_args, fake)

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"Redis was asked ({name})")

    ingress.jobs.store = Untouchable()
    app = TestClient(ingress.__serve_build_asgi_app__())
    response = app.request(method, f"/v1/images/jobs/{job_id}")
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("job_not_found", "job_id")
    assert len(error["message"]) < 300


def test_slow_upload_refusals_are_envelopes_counted_apart_from_backpressure(ingress, monkeypatch):
    """Through the whole ASGI app: a trickled body gets OpenAI's envelope (408), the connection
    is closed, and the refusal is counted as `slow_upload`."""
    monkeypatch.setattr(ingress.images, "limits", UploadLimits(body_timeout_s=0.2))
    asgi = ingress.__serve_build_asgi_app__()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/images/generations",
        "raw_path": b"/v1/images/generations",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("1.2.3.4", 5),
        "server": ("testserver", 80),
        "scheme": "http",
        "http_version": "1.1",
        "root_path": "",
    }
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(asgi(scope, Trickle(100, 0.05), send))
    start, body = sent[0], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    assert body["error"]["code"] == "body_timeout" and body["error"]["type"]
    reasons = [tags["reason"] for _, tags in ingress.frame.metrics.rejected.calls]
    assert reasons == ["slow_upload"]
