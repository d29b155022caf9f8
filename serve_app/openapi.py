"""`GET /openapi.json`: an OpenAPI 3.1 document generated from the pydantic models.

Nothing here is written by hand that pydantic already knows: request and response bodies are
`models_json_schema` output. Nor the routes: `paths` lists the documented routes of
`serve_app.routes.ROUTES` (path, methods, operation ids, who needs a key); only each operation's
parameters, content types and status codes are written here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic.json_schema import models_json_schema

from serve_app.config import AppArgs
from serve_app.protocol import (
    CompletedImageEvent,
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageJobList,
    ImageJobObject,
    ImageOptions,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
    PartialImageEvent,
)
from serve_app.routes import JOBS_ROUTE, documented, features

ERROR_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or wrong API key",
    "403": "Invalid link signature",
    "404": "Unknown model, route or image",
    "405": "Method not allowed",
    "411": "Content-Length required",
    "413": "Request or upload too large",
    "415": "Unsupported content type",
    "422": "A LoRA adapter file that cannot be loaded",
    "429": "At capacity: retry after `Retry-After` seconds",
    "500": "Internal error",
    "503": "Model replica unavailable",
    "504": "Timed out",
}
REF = "#/components/schemas/{model}"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _errors(*statuses: str) -> dict[str, Any]:
    chosen = statuses or tuple(ERROR_STATUSES)
    return {
        status: {
            "description": ERROR_STATUSES[status],
            "content": {"application/json": {"schema": _ref("ErrorResponse")}},
        }
        for status in chosen
    }


def _multipart(model: type[ImageOptions], files: dict[str, Any], required: list[str]) -> dict:
    """A multipart form: the model's scalar fields plus file parts."""
    schema = model.model_json_schema(ref_template=REF)
    properties = {
        name: prop
        for name, prop in schema["properties"].items()
        if name not in ("images", "mask")  # JSON-only forms of the files
    }
    properties.update(files)
    return {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": properties, "required": required}
        }
    }


def _images_response(streams: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref("ImagesResponse")}}
    if streams:
        content["text/event-stream"] = {
            "schema": {
                "description": "With `stream: true`: server-sent events, each `event: <type>` "
                "and `data: <one of these>`; a failure after the stream started is an "
                "`event: error` whose data is the error envelope.",
                "oneOf": [
                    _ref("PartialImageEvent"),
                    _ref("CompletedImageEvent"),
                    _ref("ErrorResponse"),
                ],
            }
        }
    return {"200": {"description": "Generated images", "content": content}, **_errors()}


def _signed_file(what: str) -> dict[str, Any]:
    """An image behind a link this server signed."""
    binary = {"type": "string", "format": "binary"}
    return {
        "parameters": [
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "expires", "in": "query", "schema": {"type": "string"}},
            {"name": "signature", "in": "query", "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {
                "description": f"{what} behind a signed link",
                "content": {f"image/{f}": {"schema": binary} for f in ("png", "jpeg", "webp")},
            },
            **_errors("403", "404", "500", "504"),
        },
    }


PREFER = {
    "name": "Prefer",
    "in": "header",
    "description": "Extension: `respond-async` queues the request as a job: `202 Accepted`, "
    f"`Location: {JOBS_ROUTE}/{{id}}` and the job object.",
    "schema": {"type": "string", "examples": ["respond-async"]},  # others are ignored
}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
BINARY = {"type": "string", "format": "binary"}


def _with_jobs(responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "202": {
            "description": "With `Prefer: respond-async`: the job, queued",
            "headers": {"Location": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": _ref("ImageJobObject")}},
        },
        **responses,
    }


def _jobs_or_not(args: AppArgs, responses: dict[str, Any]) -> dict[str, Any]:
    return _with_jobs(responses) if args.jobs.enabled else responses


# Each operation's body, by its `operationId` in `serve_app.routes.ROUTES`: everything but the
# `operationId`, the `description` and the `security` the table gives it.


def _create_image(args: AppArgs) -> dict[str, Any]:
    return {
        "parameters": [PREFER] if args.jobs.enabled else [],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ImageGenerationRequest")}},
        },
        "responses": _jobs_or_not(args, _images_response(streams=True)),
    }


def _create_image_edit(args: AppArgs) -> dict[str, Any]:
    files = {"image": BINARY, "image[]": {"type": "array", "items": BINARY}, "mask": BINARY}
    return {
        "parameters": [PREFER] if args.jobs.enabled else [],
        "requestBody": {
            "required": True,
            "content": {
                **_multipart(ImageEditRequest, files, ["prompt"]),
                "application/json": {"schema": _ref("ImageEditRequest")},
            },
        },
        "responses": _jobs_or_not(args, _images_response(streams=True)),
    }


def _create_image_variation(args: AppArgs) -> dict[str, Any]:
    return {
        "parameters": [PREFER] if args.jobs.enabled else [],
        "requestBody": {
            "required": True,
            "content": _multipart(ImageVariationRequest, {"image": BINARY}, ["image"]),
        },
        "responses": _jobs_or_not(args, _images_response(streams=False)),
    }


def _list_models(args: AppArgs) -> dict[str, Any]:
    return {
        "responses": {
            "200": {
                "description": "Served models",
                "content": {"application/json": {"schema": _ref("ModelList")}},
            },
            **_errors("401", "500", "504"),
        },
    }


def _retrieve_model(args: AppArgs) -> dict[str, Any]:
    return {
        "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "responses": {
            "200": {
                "description": "One model",
                "content": {"application/json": {"schema": _ref("ModelCard")}},
            },
            **_errors("401", "404", "500", "504"),
        },
    }


def _health(args: AppArgs) -> dict[str, Any]:
    return {
        "responses": {
            "200": {
                "description": "Every model deployment is healthy",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **_errors("500", "503", "504"),
        },
    }


def _list_image_jobs(args: AppArgs) -> dict[str, Any]:
    return {
        "parameters": [
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 100},
            },
            {"name": "after", "in": "query", "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {
                "description": "Jobs",
                "content": {"application/json": {"schema": _ref("ImageJobList")}},
            },
            **_errors("400", "401", "500", "503", "504"),
        },
    }


def _retrieve_image_job(args: AppArgs) -> dict[str, Any]:
    job = {"application/json": {"schema": _ref("ImageJobObject")}}
    return {
        "parameters": [JOB_ID],
        "responses": {
            "200": {"description": "The job", "content": job},
            **_errors("401", "404", "500", "503", "504"),
        },
    }


def _delete_image_job(args: AppArgs) -> dict[str, Any]:
    return {
        "parameters": [JOB_ID],
        "responses": {
            "200": {
                "description": "The cancelled job, or the deletion",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            **_errors("401", "404", "500", "503", "504"),
        },
    }


OPERATIONS: dict[str, Callable[[AppArgs], dict[str, Any]]] = {
    "createImage": _create_image,
    "createImageEdit": _create_image_edit,
    "createImageVariation": _create_image_variation,
    "getImageFile": lambda args: _signed_file("The image"),
    "listModels": _list_models,
    "retrieveModel": _retrieve_model,
    "health": _health,
    "listImageJobs": _list_image_jobs,
    "retrieveImageJob": _retrieve_image_job,
    "deleteImageJob": _delete_image_job,
    "getImageJobFile": lambda args: _signed_file("A job's image"),
}


def _paths(args: AppArgs) -> dict[str, Any]:
    """The table's documented routes: each method's `operationId`, its `description` (if any),
    its builder's body, and the bearer `security` of keyed routes (when keys are on)."""
    security: list[dict[str, list[str]]] = [{"bearer": []}] if args.auth.enabled else []
    paths: dict[str, Any] = {}
    for route in documented(features(args)):
        item: dict[str, Any] = {}
        for operation in route.operations:
            body: dict[str, Any] = {"operationId": operation.operation_id}
            if operation.description is not None:
                body["description"] = operation.description
            body.update(OPERATIONS[operation.operation_id](args))
            if route.access == "keyed":
                body["security"] = security
            item[operation.method.lower()] = body
        paths[route.openapi_path] = item
    return paths


def openapi_document(args: AppArgs) -> dict[str, Any]:
    _, definitions = models_json_schema(
        [
            (ImageGenerationRequest, "validation"),
            (ImageEditRequest, "validation"),
            (ImagesResponse, "serialization"),
            (ErrorResponse, "serialization"),
            (PartialImageEvent, "serialization"),
            (CompletedImageEvent, "serialization"),
            (ModelList, "serialization"),
            (ModelCard, "serialization"),
            (ImageJobObject, "serialization"),
            (ImageJobList, "serialization"),
        ],
        ref_template=REF,
    )
    model_ids = [model.id for model in args.models]
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "serve_app Images API",
            "version": "0.1.0",
            "description": f"OpenAI-compatible Images API. Models: {', '.join(model_ids)}.",
        },
        "paths": _paths(args),
        "components": {"schemas": definitions["$defs"]},
    }
    if args.auth.enabled:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
