"""`/openapi.json`: every route, request and response models, and the stream's event models."""

import json

import pytest
from starlette.testclient import TestClient

from serve_app.config import AppArgs
from serve_app.ingress import ImagesIngress
from serve_app.openapi import OPERATIONS, openapi_document
from serve_app.routes import ROUTES, documented, features

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def test_openapi_document_covers_every_route_and_the_stream_events(monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_API_KEYS", "sk-one")
    args = AppArgs(auth={"api_keys_env": "TEST_API_KEYS"}, storage={"local_dir": str(tmp_path)})
    app = TestClient(ImagesIngress(args.model_dump(), {}).__serve_build_asgi_app__())
    document = app.get("/openapi.json").json()  # open without a key
    assert document["openapi"].startswith("3.")
    assert document == json.loads(json.dumps(openapi_document(args)))
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


def served_operations(app) -> dict[str, set[str]]:
    """What the Starlette app really routes: OpenAPI path -> methods (HEAD is Starlette's)."""
    undocumented = {route.path for route in ROUTES if not route.in_openapi}
    served: dict[str, set[str]] = {}
    for route in app.routes:
        if route.path not in undocumented:
            path = route.path.replace("{model:path}", "{model}")
            served[path] = {method.lower() for method in route.methods} - {"head"}
    return served


@pytest.mark.parametrize("jobs", [True, False])
@pytest.mark.parametrize("auth", [True, False])
def test_the_document_lists_exactly_the_routes_the_ingress_serves(
    monkeypatch, tmp_path, jobs, auth
):
    """Paths, methods, operation ids and security come from `routes.ROUTES`; every route the
    app serves is documented unless the table says otherwise (`in_openapi=False`)."""
    monkeypatch.setenv("TEST_API_KEYS", "sk-one")
    extra = {"auth": {"api_keys_env": "TEST_API_KEYS"}} if auth else {}
    args = AppArgs(storage={"local_dir": str(tmp_path)}, jobs={"enabled": jobs}, **extra)
    document = openapi_document(args)
    paths = document["paths"]
    table = documented(features(args))
    assert list(paths) == [route.openapi_path for route in table]  # table order
    for route in table:
        item = paths[route.openapi_path]
        assert [method for method in item if method in METHODS] == [
            method.lower() for method in route.methods
        ]
        for method in route.methods:
            operation = item[method.lower()]
            assert operation["operationId"] == route.operation_id(method)
            keyed = route.access == "keyed"
            assert ("security" in operation) == keyed, route.path
            if keyed:
                assert operation["security"] == ([{"bearer": []}] if auth else [])
    app = ImagesIngress(args.model_dump(), {}).__serve_build_asgi_app__()
    documented_operations = {
        path: {method for method in item if method in METHODS} for path, item in paths.items()
    }
    assert served_operations(app) == documented_operations
    assert ("/v1/images/jobs" in paths) == jobs


def test_every_operation_builder_belongs_to_one_table_operation():
    ids = [op.operation_id for route in ROUTES for op in route.operations]
    assert len(ids) == len(set(ids)), "operation ids are unique"
    documented_ids = {
        op.operation_id for route in ROUTES if route.in_openapi for op in route.operations
    }
    assert set(OPERATIONS) == documented_ids


def test_undocumented_routes_are_the_playground_and_the_document_itself():
    assert {route.path for route in ROUTES if not route.in_openapi} == {
        "/openapi.json",
        "/",
        "/playground",
        "/playground/{name}",
    }
