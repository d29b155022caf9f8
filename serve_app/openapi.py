"""`GET /openapi.json`: an OpenAPI 3.1 document generated from the pydantic models.

Nothing here is written by hand that pydantic already knows: request and response bodies are
`models_json_schema` output; only the routes, content types and status codes are listed here.
"""

from __future__ import annotations

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


def _signed_file(operation_id: str, what: str) -> dict[str, Any]:
    """An image behind a link this server signed."""
    binary = {"type": "string", "format": "binary"}
    return {
        "get": {
            "operationId": operation_id,
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
    }


PREFER = {
    "name": "Prefer",
    "in": "header",
    "description": "Extension: `respond-async` queues the request as a job: `202 Accepted`, "
    "`Location: /v1/images/jobs/{id}` and the job object.",
    "schema": {"type": "string", "examples": ["respond-async"]},  # others are ignored
}
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _with_jobs(responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "202": {
            "description": "With `Prefer: respond-async`: the job, queued",
            "headers": {"Location": {"schema": {"type": "string"}}},
            "content": {"application/json": {"schema": _ref("ImageJobObject")}},
        },
        **responses,
    }


def _job_paths(security: list) -> dict[str, Any]:
    job = {"application/json": {"schema": _ref("ImageJobObject")}}
    return {
        "/v1/images/jobs": {
            "get": {
                "operationId": "listImageJobs",
                "description": "Extension: this key's jobs, newest first (without results).",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                ],  # fmt: skip
                "responses": {
                    "200": {
                        "description": "Jobs",
                        "content": {"application/json": {"schema": _ref("ImageJobList")}},
                    },
                    **_errors("400", "401", "500", "503", "504"),
                },
                "security": security,
            }
        },
        "/v1/images/jobs/{job_id}": {
            "get": {
                "operationId": "retrieveImageJob",
                "description": "Extension: a job; when completed, `result` is the images "
                "response the synchronous call would have given.",
                "parameters": [JOB_ID],
                "responses": {
                    "200": {"description": "The job", "content": job},
                    **_errors("401", "404", "500", "503", "504"),
                },
                "security": security,
            },
            "delete": {
                "operationId": "deleteImageJob",
                "description": "Extension: cancel a queued or running job (the job, "
                "cancelled); delete a finished one and its images.",
                "parameters": [JOB_ID],
                "responses": {
                    "200": {
                        "description": "The cancelled job, or the deletion",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors("401", "404", "500", "503", "504"),
                },
                "security": security,
            },
        },
        "/v1/images/jobs/files/{name}": _signed_file("getImageJobFile", "A job's image"),
    }


def _jobs_or_not(args: AppArgs, responses: dict[str, Any]) -> dict[str, Any]:
    return _with_jobs(responses) if args.jobs.enabled else responses


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
    binary = {"type": "string", "format": "binary"}
    security = [{"bearer": []}] if args.auth.enabled else []
    model_ids = [model.id for model in args.models]
    paths = {
        "/v1/images/generations": {
            "post": {
                "operationId": "createImage",
                "parameters": [PREFER] if args.jobs.enabled else [],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ImageGenerationRequest")}},
                },
                "responses": _jobs_or_not(args, _images_response(streams=True)),
                "security": security,
            }
        },
        "/v1/images/edits": {
            "post": {
                "operationId": "createImageEdit",
                "parameters": [PREFER] if args.jobs.enabled else [],
                "requestBody": {
                    "required": True,
                    "content": {
                        **_multipart(
                            ImageEditRequest,
                            {
                                "image": binary,
                                "image[]": {"type": "array", "items": binary},
                                "mask": binary,
                            },
                            ["prompt"],
                        ),
                        "application/json": {"schema": _ref("ImageEditRequest")},
                    },
                },
                "responses": _jobs_or_not(args, _images_response(streams=True)),
                "security": security,
            }
        },
        "/v1/images/variations": {
            "post": {
                "operationId": "createImageVariation",
                "parameters": [PREFER] if args.jobs.enabled else [],
                "requestBody": {
                    "required": True,
                    "content": _multipart(ImageVariationRequest, {"image": binary}, ["image"]),
                },
                "responses": _jobs_or_not(args, _images_response(streams=False)),
                "security": security,
            }
        },
        "/v1/images/files/{name}": _signed_file("getImageFile", "The image"),
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "responses": {
                    "200": {
                        "description": "Served models",
                        "content": {"application/json": {"schema": _ref("ModelList")}},
                    },
                    **_errors("401", "500", "504"),
                },
                "security": security,
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
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
                "security": security,
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "responses": {
                    "200": {
                        "description": "Every model deployment is healthy",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_errors("500", "503", "504"),
                },
            }
        },
    }
    if args.jobs.enabled:
        paths.update(_job_paths(security))
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "serve_app Images API",
            "version": "0.1.0",
            "description": f"OpenAI-compatible Images API. Models: {', '.join(model_ids)}.",
        },
        "paths": paths,
        "components": {"schemas": definitions["$defs"]},
    }
    if args.auth.enabled:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
