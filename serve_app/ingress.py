"""The ingress deployment: the route table, and the wiring of the HTTP pieces to Ray.

Everything an endpoint does lives in `serve_app.http`; this module only says which route goes
where and connects model ids to their deployment handles. Never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve_app import memory
from serve_app.auth import KeyStore
from serve_app.config import AppArgs
from serve_app.http.errors import error_response
from serve_app.http.jobs import JOBS_ROUTE, JobRoutes
from serve_app.http.meta import MetaRoutes, ModelStatus
from serve_app.http.middleware import RequestFrame, current_request_id
from serve_app.http.playground import PlaygroundRoutes
from serve_app.http.service import ImagesService, adapter_registries
from serve_app.metrics import IngressMetrics
from serve_app.model_client import ModelClient, RayModelClient
from serve_app.storage import FILES_ROUTE, JOB_FILES_ROUTE, cleanup_forever, make_store

logger = logging.getLogger("ray.serve")


class ImagesIngress:
    """The HTTP front door; `model_handles` maps model id -> model deployment handle
    (`client_factory` makes each a `ModelClient`; unit tests pass fakes through it)."""

    def __init__(
        self,
        args: dict,
        model_handles: dict,
        client_factory: Callable[[Any], ModelClient] = RayModelClient,
        job_consumer: Any = None,
    ) -> None:
        """`job_consumer` is the job consumer deployment's handle, bound here so the app
        deploys it; the ingress reaches it through Redis, never through the handle."""
        self.args = AppArgs.model_validate(args)
        memory.prefer_mmap()  # decoded images' memory goes back to the OS when freed
        self.store = make_store(self.args.storage)
        keys = KeyStore.from_config(self.args.auth)
        metrics = IngressMetrics()
        self.frame = RequestFrame(keys, self.args.limits.request_timeout_s, metrics)
        self.jobs = JobRoutes(self.args) if self.args.jobs.enabled else None
        adapters = adapter_registries(self.args)
        self.images = ImagesService(
            self.args,
            {model_id: client_factory(handle) for model_id, handle in model_handles.items()},
            self.store,
            metrics,
            self.jobs,
            adapters,
        )
        self.meta = MetaRoutes(
            self.args,
            self.store,
            self._model_statuses,
            adapters,
            self.jobs.health if self.jobs is not None else None,
        )
        logger.info(
            "ImagesIngress: models %s, API keys %s",
            [model.id for model in self.args.models],
            f"required ({len(keys)} configured)" if keys else "not required",
        )
        try:
            loop = asyncio.get_running_loop()
            interval = self.args.storage.cleanup_interval_s
            self._cleanup_task = loop.create_task(cleanup_forever(self.store, interval))
            if self.jobs is not None:
                self._job_cleanup = loop.create_task(cleanup_forever(self.jobs.images, interval))
        except RuntimeError:  # constructed outside an event loop (tests): no background cleanup
            self._cleanup_task = None

    def routes(self) -> list[tuple[str, str, object]]:
        """The route table: path, method, handler."""
        routes = [
            ("/v1/images/generations", "POST", self.images.create_generation),
            ("/v1/images/edits", "POST", self.images.create_edit),
            ("/v1/images/variations", "POST", self.images.create_variation),
            (FILES_ROUTE + "/{name}", "GET", self.meta.get_file),
            ("/v1/models", "GET", self.meta.list_models),
            ("/v1/models/{model:path}", "GET", self.meta.get_model),
            ("/health", "GET", self.meta.health),
            ("/openapi.json", "GET", self.meta.openapi),
        ]
        if self.jobs is not None:
            routes += [
                (JOBS_ROUTE, "GET", self.jobs.list_jobs),
                (JOB_FILES_ROUTE + "/{name}", "GET", self.jobs.get_file),
                (JOBS_ROUTE + "/{job_id}", "GET,DELETE", self.jobs.job),
            ]
        if self.args.playground:
            playground = PlaygroundRoutes()
            routes += [
                ("/", "GET", playground.page),
                ("/playground", "GET", playground.page),
                ("/playground/{name}", "GET", playground.asset),
            ]
        return routes

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            Route(path, self.frame.wrap(handler, path), methods=method.split(","))
            for path, method, handler in self.routes()
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            return error_response(exc, current_request_id(request))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    def _model_statuses(self) -> dict[str, ModelStatus]:
        app_name = serve.get_replica_context().app_name
        deployments = serve.status().applications[app_name].deployments
        statuses = {}
        for model in self.args.models:
            info = deployments.get(model.deployment_name)
            statuses[model.id] = ModelStatus(
                status=str(info.status.value) if info else "MISSING",
                running_replicas=info.replica_states.get("RUNNING", 0) if info else 0,
            )
        return statuses
