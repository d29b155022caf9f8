"""The images service and request frame over a fake model client (no Ray, no torch): response
shapes, url and stream dispatch, errors a replica raises, time limits and metric labels."""

import json

from serve_app.contract import APIError
from serve_app.protocol import CompletedImageEvent, ErrorResponse, PartialImageEvent
from tests.conftest import decode_base64_image, decode_image
from tests.unit.conftest import MODEL


def generate(app, **fields):
    return app.post("/v1/images/generations", json={"prompt": "a cat", "size": "96x64", **fields})


def sse_events(text):
    events = []
    for block in text.strip().split("\n\n"):
        event_line, data_line = block.split("\n")
        events.append((event_line.removeprefix("event: "), json.loads(data_line[len("data: ") :])))
    return events


def test_b64_response_has_one_image_per_seed_and_real_usage(app, fake):
    response = generate(app, n=2, seed=40)
    assert response.status_code == 200 and response.headers["x-batch-images"] == "2"
    body = response.json()
    assert [item["seed"] for item in body["data"]] == [40, 41]
    colours = [decode_base64_image(item["b64_json"]).getpixel((0, 0)) for item in body["data"]]
    assert colours == [(40, 7, 9), (41, 7, 9)]
    assert body["usage"]["input_tokens"] == 5
    assert body["usage"]["output_tokens"] == 2 * (96 // 16) * (64 // 16)
    [job] = fake.jobs
    assert (job.prompt, job.width, job.height, job.seeds) == ("a cat", 96, 64, (40, 41))


def test_url_response_links_serve_the_same_bytes(app):
    body = generate(app, seed=3, response_format="url").json()
    [item] = body["data"]
    assert item["b64_json"] is None
    image = app.get(item["url"].removeprefix("http://testserver"))
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert decode_image(image.content).getpixel((0, 0)) == (3, 7, 9)


def test_stream_events_validate_against_the_documented_models(app, fake):
    response = generate(app, n=2, seed=1, stream=True, partial_images=2, num_inference_steps=6)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    partials = [
        PartialImageEvent.model_validate(d) for t, d in events if t.endswith("partial_image")
    ]
    done = [CompletedImageEvent.model_validate(d) for t, d in events if t.endswith("completed")]
    assert all(t == d["type"] for t, d in events)
    assert [(p.image_index, p.partial_image_index) for p in partials] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
    ]
    assert [(c.image_index, c.seed) for c in done] == [(0, 1), (1, 2)]
    assert done[0].type == "image_generation.completed" and done[0].usage.input_tokens == 5
    assert fake.jobs[0].preview_steps == (1, 3)


def test_an_error_after_the_stream_started_is_an_error_event(app, fake):
    fake.fail_mid_stream = APIError("replica lost", status=503, code="model_unavailable")
    response = generate(app, stream=True, partial_images=1, num_inference_steps=4)
    events = sse_events(response.text)
    assert [t for t, _ in events] == ["image_generation.partial_image", "error"]
    error = ErrorResponse.model_validate(events[-1][1]).error
    assert error.code == "model_unavailable" and "request id" in error.message


def test_errors_raised_in_a_replica_keep_status_and_headers(app, fake):
    fake.fail = APIError("busy", status=429, code="busy", headers={"Retry-After": "9"})
    response = generate(app)
    assert response.status_code == 429 and response.headers["retry-after"] == "9"
    assert response.json()["error"]["code"] == "busy"


def test_requests_past_the_time_limit_get_a_504(app, fake):
    fake.delay = 30
    response = generate(app, size="64x64", extra=None)
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "timeout"


def test_metric_labels_agree_between_plain_and_streamed_requests(app, ingress):
    assert generate(app, n=2).status_code == 200
    assert generate(app, n=2, stream=True).status_code == 200
    images = ingress.images.metrics.images.calls
    assert images == [(2, {"endpoint": "generation", "model": MODEL})] * 2
    requests = ingress.frame.metrics.requests.calls
    assert [tags for _, tags in requests] == [
        {"endpoint": "/v1/images/generations", "model": MODEL, "status": "200", "key": "-"}
    ] * 2
