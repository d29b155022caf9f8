"""Every route the ingress serves, written once.

`ROUTES` is the one table: the ingress builds its Starlette routes from it (resolving each
`handler` on itself), the request frame asks it whether a route needs an API key (`access`),
and `/openapi.json` renders its `paths` from it (each operation's body comes from the builder
`serve_app.openapi` has under its `operation_id`). No Starlette, no Ray.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from serve_app.config import AppArgs

# Who may call a route: `keyed` needs an API key (when keys are configured); `signed` carries
# its own authorisation (an image link this server signed); `public` is open (load balancers,
# tools, the browser playground, which holds no secrets).
Access = Literal["keyed", "public", "signed"]
# A route served only while its feature is on (`jobs.enabled`, `playground` in the app args).
Feature = Literal["jobs", "playground"]

FILES_ROUTE = "/v1/images/files"  # signed links to `response_format: url` images
JOBS_ROUTE = "/v1/images/jobs"
JOB_FILES_ROUTE = JOBS_ROUTE + "/files"  # signed links to asynchronous jobs' images

_CONVERTER = re.compile(r"\{(\w+):\w+\}")  # Starlette's `{model:path}`; OpenAPI says `{model}`


@dataclass(frozen=True)
class Operation:
    """One method of a route. `description` (when set) is the OpenAPI operation's."""

    method: str
    operation_id: str
    description: str | None = None


@dataclass(frozen=True)
class RouteSpec:
    """A route: its Starlette path template, the ingress attribute that handles it
    (`"images.create_generation"`: `ingress.images.create_generation`), its methods, who may
    call it, what it is for, and whether it is served (`feature`) and documented (`in_openapi`)."""

    path: str
    handler: str
    operations: tuple[Operation, ...]
    access: Access
    doc: str
    feature: Feature | None = None
    in_openapi: bool = True

    def __post_init__(self) -> None:
        methods = [operation.method for operation in self.operations]
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"{self.path}: each route needs distinct methods, got {methods}")
        if any(method != method.upper() for method in methods):
            raise ValueError(f"{self.path}: methods are upper case, got {methods}")

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(operation.method for operation in self.operations)

    @property
    def openapi_path(self) -> str:
        """The path as OpenAPI writes it: `/v1/models/{model}` for `/v1/models/{model:path}`."""
        return _CONVERTER.sub(r"{\1}", self.path)

    def operation_id(self, method: str) -> str:
        for operation in self.operations:
            if operation.method == method.upper():
                return operation.operation_id
        raise KeyError(f"{self.path} has no {method} operation")


def _get(operation_id: str, description: str | None = None) -> tuple[Operation, ...]:
    return (Operation("GET", operation_id, description),)


def _post(operation_id: str) -> tuple[Operation, ...]:
    return (Operation("POST", operation_id),)


# In the order OpenAPI lists them (Starlette's matching does not depend on it: no two of these
# templates match the same path).
ROUTES: tuple[RouteSpec, ...] = (
    RouteSpec(
        "/v1/images/generations",
        "images.create_generation",
        _post("createImage"),
        "keyed",
        "Images from a prompt (JSON); streamed with `stream: true`.",
    ),
    RouteSpec(
        "/v1/images/edits",
        "images.create_edit",
        _post("createImageEdit"),
        "keyed",
        "Edit one or more images (multipart or JSON), optionally with a mask.",
    ),
    RouteSpec(
        "/v1/images/variations",
        "images.create_variation",
        _post("createImageVariation"),
        "keyed",
        "Variations of one image (multipart).",
    ),
    RouteSpec(
        FILES_ROUTE + "/{name}",
        "meta.get_file",
        _get("getImageFile"),
        "signed",
        "A `url` image behind the link this server signed.",
    ),
    RouteSpec(
        "/v1/models",
        "meta.list_models",
        _get("listModels"),
        "keyed",
        "The served models, then their LoRA adapters as `<model>:<adapter>`.",
    ),
    RouteSpec(
        "/v1/models/{model:path}",
        "meta.get_model",
        _get("retrieveModel"),
        "keyed",
        "One model or `<model>:<adapter>`.",
    ),
    RouteSpec(
        "/health",
        "meta.health",
        _get("health"),
        "public",
        "Readiness: every model has a running replica (jobs: degraded, not down).",
    ),
    RouteSpec(
        "/openapi.json",
        "meta.openapi",
        _get("getOpenAPIDocument"),
        "public",
        "This API's OpenAPI document.",
        in_openapi=False,
    ),
    RouteSpec(
        JOBS_ROUTE,
        "jobs.list_jobs",
        _get(
            "listImageJobs",
            "Extension: this key's jobs, newest first (without results).",
        ),
        "keyed",
        "This key's asynchronous jobs.",
        feature="jobs",
    ),
    RouteSpec(
        JOBS_ROUTE + "/{job_id}",
        "jobs.job",  # one handler for both methods: one `Allow` header
        (
            Operation(
                "GET",
                "retrieveImageJob",
                "Extension: a job; when completed, `result` is the images response the "
                "synchronous call would have given.",
            ),
            Operation(
                "DELETE",
                "deleteImageJob",
                "Extension: cancel a queued or running job (the job, cancelled); delete a "
                "finished one and its images.",
            ),
        ),
        "keyed",
        "One asynchronous job: read it, cancel or delete it.",
        feature="jobs",
    ),
    RouteSpec(
        JOB_FILES_ROUTE + "/{name}",
        "jobs.get_file",
        _get("getImageJobFile"),
        "signed",
        "A job's `url` image behind the link this server signed.",
        feature="jobs",
    ),
    RouteSpec(
        "/",
        "playground.page",
        _get("getPlaygroundRoot"),
        "public",
        "The browser playground's page.",
        feature="playground",
        in_openapi=False,
    ),
    RouteSpec(
        "/playground",
        "playground.page",
        _get("getPlayground"),
        "public",
        "The browser playground's page.",
        feature="playground",
        in_openapi=False,
    ),
    RouteSpec(
        "/playground/{name}",
        "playground.asset",
        _get("getPlaygroundAsset"),
        "public",
        "The playground's script and style sheet.",
        feature="playground",
        in_openapi=False,
    ),
)


def features(args: AppArgs) -> frozenset[Feature]:
    """The optional features these app args turn on."""
    on: set[Feature] = set()
    if args.jobs.enabled:
        on.add("jobs")
    if args.playground:
        on.add("playground")
    return frozenset(on)


def served(on: Collection[str]) -> tuple[RouteSpec, ...]:
    """The routes served while the features `on` are on, in table order."""
    return tuple(route for route in ROUTES if route.feature is None or route.feature in on)


def documented(on: Collection[str]) -> tuple[RouteSpec, ...]:
    """The served routes that `/openapi.json` lists."""
    return tuple(route for route in served(on) if route.in_openapi)
