"""What a hostile or sloppy client sends, against the ingress over a fake model (no Ray): every
case is a clear 4xx (or the documented 429/499/503), never a 500."""

import asyncio
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from starlette.testclient import TestClient

from serve_app.contract import APIError
from serve_app.http.decoding import PixelBudget
from serve_app.http.meta import ModelStatus
from serve_app.protocol import MAX_SEED
from tests.unit.conftest import MODEL, ingress_for


def png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def ztxt_bomb() -> bytes:
    """A valid 64x64 PNG with a zTXt chunk that inflates to 50 MB (past Pillow's text limit)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 50_000_000, zip=True)
    return png(Image.new("RGB", (64, 64)), pnginfo=info)


def error_of(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


def post_json(app, path, content, **headers):
    return app.post(path, content=content, headers={"content-type": "application/json", **headers})


# --- JSON the parser or the validators refuse --------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",  # nested 2,000 deep
        b'{"prompt": "x", "n": ' + b"9" * 10_000 + b"}",  # past int()'s digit limit
        b'{"prompt": "x"',  # truncated
        b"\xff\xfe{}",  # not UTF-8
    ],
    ids=["deep", "digits", "truncated", "encoding"],
)
def test_json_the_parser_refuses_is_a_400(app, content):
    error = error_of(post_json(app, "/v1/images/generations", content), 400)
    assert "not valid JSON" in error["message"]


def test_text_that_is_not_unicode_is_a_400_naming_the_field(app, fake):
    response = post_json(app, "/v1/images/generations", b'{"prompt": "a\\ud800"}')
    assert "unpaired surrogate" in error_of(response, 400, "prompt")["message"]
    response = post_json(app, "/v1/images/generations", b'{"prompt": "a", "user": "\\udfff"}')
    error_of(response, 400, "user")
    assert fake.jobs == []  # no work was done


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"n": True}, "n"),
        ({"n": 2.0}, "n"),
        ({"seed": "42"}, "seed"),
        ({"guidance": "3"}, "guidance"),
        ({"guidance": False}, "guidance"),
        ({"size": "\u0661\u0662\u0668x\u0661\u0662\u0668"}, "size"),  # Arabic-Indic 128x128
        ({"image": "data:image/png;base64,AAAA"}, "image"),  # generations take no images
        ({"mask": {}}, "mask"),
    ],
)
def test_loose_json_types_and_foreign_fields_are_refused(app, fields, param):
    response = app.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", **fields})
    error_of(response, 400, param)


def test_form_fields_are_ascii_numbers_and_true_false(app, fake):
    image = png(Image.new("RGB", (64, 64), "red"))
    ok = app.post(
        "/v1/images/edits",
        files={"image": ("a.png", image, "image/png")},
        data={"prompt": "x", "n": "2", "seed": "7", "guidance": "3.5", "stream": "false"},
    )
    assert ok.status_code == 200, ok.text
    assert (fake.jobs[-1].n, fake.jobs[-1].seeds[0], fake.jobs[-1].guidance) == (2, 7, 3.5)
    for field, value in [("n", "\u0662"), ("stream", "yes"), ("seed", "1e3")]:
        response = app.post(
            "/v1/images/edits",
            files={"image": ("a.png", image, "image/png")},
            data={"prompt": "x", field: value},
        )
        error_of(response, 400, field)


def test_a_prompt_sent_to_variations_is_refused_not_ignored(app):
    response = app.post(
        "/v1/images/variations",
        files={"image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png")},
        data={"prompt": "make it blue"},
    )
    assert "variations take no prompt" in error_of(response, 400, "prompt")["message"]


def test_every_returned_seed_is_one_the_api_accepts(app):
    error = error_of(
        app.post("/v1/images/generations", json={"prompt": "x", "seed": MAX_SEED, "n": 2}),
        400,
        "seed",
    )
    assert str(MAX_SEED - 1) in error["message"]
    response = app.post(
        "/v1/images/generations",
        json={"prompt": "x", "size": "64x64", "seed": MAX_SEED - 1, "n": 2},
    )
    assert [item["seed"] for item in response.json()["data"]] == [MAX_SEED - 1, MAX_SEED]


# --- images that break decoders --------------------------------------------------------------


def test_decoder_errors_are_400s_on_every_route_that_takes_images(app):
    bomb = ztxt_bomb()
    edit = app.post(
        "/v1/images/edits", files={"image": ("a.png", bomb, "image/png")}, data={"prompt": "x"}
    )
    assert "could not be read" in error_of(edit, 400, "image")["message"]
    variation = app.post("/v1/images/variations", files={"image": ("a.png", bomb, "image/png")})
    error_of(variation, 400, "image")
    url = "data:image/png;base64," + __import__("base64").b64encode(bomb).decode()
    json_edit = app.post("/v1/images/edits", json={"prompt": "x", "images": [{"image_url": url}]})
    error_of(json_edit, 400, "images[0].image_url")
    mask = app.post(
        "/v1/images/edits",
        files={
            "image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png"),
            "mask": ("m.png", bomb, "image/png"),
        },
        data={"prompt": "x"},
    )
    error_of(mask, 400, "mask")


def test_animated_inputs_are_refused(app):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    for fmt in ("PNG", "WEBP"):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
        response = app.post(
            "/v1/images/edits",
            files={"image": ("a", buffer.getvalue(), "application/octet-stream")},
            data={"prompt": "x"},
        )
        assert "animated" in error_of(response, 400, "image")["message"]


@pytest.fixture
def tight_limits(app_args):
    app_args["limits"].update(
        max_input_pixels=1_000_000,
        max_input_pixels_per_request=1_500_000,
        max_decoding_pixels=1_500_000,
    )


def test_a_request_decoding_too_many_pixels_is_refused_before_decoding(tight_limits, app, fake):
    big = png(Image.new("RGB", (1000, 1000)))
    response = app.post(
        "/v1/images/edits",
        files=[("image[]", ("a.png", big, "image/png")), ("image[]", ("b.png", big, "image/png"))],
        data={"prompt": "x"},
    )
    assert "2000000 pixels" in error_of(response, 400, "image[]")["message"]
    assert fake.jobs == []


def test_jpegs_decode_reduced(tight_limits, app_args, fake):
    """With a model whose largest side is 512, a 16 MP JPEG decodes at 1/4 scale (1 MP, within
    a 1 MP per-image limit) and reaches the model shrunk to 512 pixels."""
    app_args["models"] = [
        {"id": MODEL, "source": "tiny", "max_side": 512, "default_size": "512x512"}
    ]
    app = TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())
    buffer = io.BytesIO()
    Image.new("RGB", (4000, 4000), "green").save(buffer, format="JPEG")
    response = app.post(
        "/v1/images/edits",
        files={"image": ("a.jpg", buffer.getvalue(), "image/jpeg")},
        data={"prompt": "x"},
    )
    assert response.status_code == 200, response.text
    assert max(fake.jobs[-1].conditioning[0].size) <= 512


def test_the_process_decoding_budget_queues_then_sheds_with_retry_after():
    async def scenario():
        budget = PixelBudget(100)
        order = []

        async def hold(name, pixels, seconds):
            async with budget.reserve(pixels, wait_s=1):
                order.append(f"{name} in ({budget.in_use})")
                await asyncio.sleep(seconds)
            order.append(f"{name} out")

        await asyncio.gather(hold("a", 80, 0.1), hold("b", 50, 0))
        async with budget.reserve(100, wait_s=1):
            with pytest.raises(APIError) as info:
                async with budget.reserve(1, wait_s=0.05):
                    pass
        return order, info.value, budget.in_use

    order, error, in_use = asyncio.run(scenario())
    assert order == ["a in (80)", "a out", "b in (50)", "b out"]  # b waited for a
    assert error.status == 503 and error.headers == {"Retry-After": "2"} and in_use == 0


# --- links, ids, keys, disconnects, readiness -------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["expires=1&signature=\u00e9", "expires=" + "9" * 10_000 + "&signature=" + "a" * 64],
)
def test_malformed_image_links_are_403(app, query):
    response = app.get("/v1/images/files/" + "a" * 24 + ".png?" + query)
    assert error_of(response, 403)["code"] == "invalid_signature"


def test_an_unusable_request_id_is_replaced_not_repeated(app):
    huge = "x" * 60_000
    response = app.post("/v1/images/generations", json={}, headers={"x-request-id": huge})
    message = error_of(response, 400, "prompt")["message"]
    assert huge not in message and len(message) < 300
    fine = app.post("/v1/images/generations", json={}, headers={"x-request-id": "abc-123"})
    assert "abc-123" in fine.json()["error"]["message"]


@pytest.fixture
def with_keys(app_args, monkeypatch):
    monkeypatch.setenv("HOSTILE_KEYS", "sk-right")
    app_args["auth"] = {"api_keys_env": "HOSTILE_KEYS"}


def test_wrong_keys_are_throttled_per_client_and_the_right_key_still_works(with_keys, app):
    statuses = [
        app.get("/v1/models", headers={"Authorization": f"Bearer wrong-{i}"}).status_code
        for i in range(25)
    ]
    assert statuses[:20] == [401] * 20 and statuses[20:] == [429] * 5
    throttled = app.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert int(throttled.headers["retry-after"]) >= 1
    assert throttled.json()["error"]["code"] == "too_many_auth_failures"
    assert app.get("/v1/models", headers={"Authorization": "Bearer sk-right"}).status_code == 200


def test_a_client_gone_mid_upload_is_a_499_not_a_500(ingress, caplog):
    app = ingress.__serve_build_asgi_app__()
    sent = []

    async def scenario():
        messages = [
            {
                "type": "http.request",
                "body": b"--b\r\nContent-Disposition: form-data; ",
                "more_body": True,
            },
            {"type": "http.disconnect"},
        ]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/images/edits",
            "raw_path": b"/v1/images/edits",
            "query_string": b"",
            "headers": [
                (b"content-type", b"multipart/form-data; boundary=b"),
                (b"content-length", b"100000"),
            ],
            "client": ("127.0.0.1", 5555),
            "server": ("testserver", 80),
            "scheme": "http",
            "root_path": "",
            "http_version": "1.1",
        }
        await app(scope, receive, send)

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(scenario())
    assert sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    [(_, tags)] = ingress.frame.metrics.requests.calls
    assert tags["status"] == "499"
    assert any('"client_closed": true' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "status, running, code",
    [("HEALTHY", 1, 200), ("UPSCALING", 1, 200), ("DOWNSCALING", 2, 200), ("UPDATING", 0, 503)],
)
def test_ready_means_a_running_replica_per_model(ingress, status, running, code):
    from starlette.testclient import TestClient

    ingress.meta.statuses = lambda: {MODEL: ModelStatus(status, running)}
    response = TestClient(ingress.__serve_build_asgi_app__()).get("/health")
    assert response.status_code == code
    if code == 200:
        assert response.json()["models"][MODEL] == {"status": status, "running_replicas": running}
    else:
        assert response.json()["error"]["code"] == "not_ready"


def test_pixels_of_every_mode_convert_with_correct_scaling():
    from serve_app.uploads import decode_upload

    limits = dict(max_bytes=10_000_000, max_pixels=1_000_000)
    grey16 = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert decode_upload(png(grey16), **limits).getpixel((0, 0)) == (128, 128, 128)
    full = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert decode_upload(png(full), **limits).getpixel((0, 0)) == (255, 255, 255)
    from serve_app.uploads import to_8_bit

    as_int32 = Image.fromarray(np.full((8, 8), 32768, np.int32), "I")  # Pillow can't write it
    assert to_8_bit(as_int32).getpixel((0, 0)) == 128
    la = Image.new("LA", (8, 8), (10, 0))  # fully transparent -> white
    assert decode_upload(png(la), **limits).getpixel((0, 0)) == (255, 255, 255)
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=100)
    red = decode_upload(buffer.getvalue(), **limits).getpixel((0, 0))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_json_depth_error_text_is_json_serialisable(app):
    # The envelope itself must be valid JSON whatever the input looked like.
    response = post_json(app, "/v1/images/generations", b"[" * 5000)
    assert json.loads(response.text)["error"]["code"] is None
