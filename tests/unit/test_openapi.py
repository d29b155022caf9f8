"""`/openapi.json`: every route, request and response models, and the stream's event models."""

import json

from starlette.testclient import TestClient

from serve_app.config import AppArgs
from serve_app.ingress import ImagesIngress


def test_openapi_document_covers_every_route_and_the_stream_events(monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_API_KEYS", "sk-one")
    args = AppArgs(auth={"api_keys_env": "TEST_API_KEYS"}, storage={"local_dir": str(tmp_path)})
    app = TestClient(ImagesIngress(args.model_dump(), {}).__serve_build_asgi_app__())
    document = app.get("/openapi.json").json()  # open without a key
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/images/files/{name}",
        "/v1/models",
        "/v1/models/{model}",
        "/health",
        "/v1/images/jobs",
        "/v1/images/jobs/{job_id}",
        "/v1/images/jobs/files/{name}",
    }
    generations = document["paths"]["/v1/images/generations"]["post"]
    assert generations["parameters"][0]["name"] == "Prefer"
    assert generations["responses"]["202"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("ImageJobObject")
    schemas = document["components"]["schemas"]
    assert schemas["ImageGenerationRequest"]["required"] == ["prompt"]
    assert "seed" in schemas["ImageData"]["properties"]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    responses = document["paths"]["/v1/images/generations"]["post"]["responses"]["200"]
    stream = responses["content"]["text/event-stream"]["schema"]
    names = [ref["$ref"].rsplit("/", 1)[1] for ref in stream["oneOf"]]
    assert names == ["PartialImageEvent", "CompletedImageEvent", "ErrorResponse"]
    assert set(schemas["PartialImageEvent"]["properties"]["type"]["enum"]) == {
        "image_generation.partial_image",
        "image_edit.partial_image",
    }
    assert "usage" in schemas["CompletedImageEvent"]["required"]
    json.dumps(document)
