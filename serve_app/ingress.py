"""The ingress deployment: the wiring of the HTTP pieces to Ray.

Everything an endpoint does lives in `serve_app.http`; which route goes where is the table in
`serve_app.routes` (this module resolves its handlers). It connects model ids to their deployment
handles. Never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import reduce
from typing import Any

from ray import serve
from ray.serve.schema import ReplicaState
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve_app import memory
from serve_app.auth import KeyStore
from serve_app.config import AppArgs
from serve_app.http.errors import error_response
from serve_app.http.jobs import JobRoutes
from serve_app.http.meta import MetaRoutes, ModelStatus
from serve_app.http.middleware import Handler, RequestFrame, current_request_id
from serve_app.http.playground import PlaygroundRoutes
from serve_app.http.service import ImagesService, adapter_registries
from serve_app.metrics import IngressMetrics
from serve_app.model_client import ModelClient, RayModelClient
from serve_app.routes import Feature, RouteSpec, served
from serve_app.storage import cleanup_forever, make_store

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
        self.playground = PlaygroundRoutes() if self.args.playground else None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._job_cleanup: asyncio.Task[None] | None = None
        try:
            loop = asyncio.get_running_loop()
            interval = self.args.storage.cleanup_interval_s
            self._cleanup_task = loop.create_task(cleanup_forever(self.store, interval))
            if self.jobs is not None:
                self._job_cleanup = loop.create_task(cleanup_forever(self.jobs.images, interval))
        except RuntimeError:  # constructed outside an event loop (tests): no background cleanup
            pass

    @staticmethod
    def deployment_options(args: AppArgs) -> dict[str, Any]:
        """The `serve.deployment` options of the ingress (`app.py` binds it with them)."""
        return {
            "name": "ImagesIngress",
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": 256,
            "logging_config": {"enable_access_log": args.access_log},
        }

    def routes(self) -> list[tuple[RouteSpec, Handler]]:
        """The routes of `serve_app.routes.ROUTES` these args serve (jobs while jobs are on, the
        playground while it is), each with its handler resolved on this ingress."""
        on: set[Feature] = set()
        if self.jobs is not None:
            on.add("jobs")
        if self.playground is not None:
            on.add("playground")
        return [(route, self._handler(route)) for route in served(on)]

    def _handler(self, route: RouteSpec) -> Handler:
        """`"images.create_generation"` -> `self.images.create_generation`."""
        handler = reduce(getattr, route.handler.split("."), self)
        if not callable(handler):
            raise TypeError(f"route {route.path}: {route.handler} is not a handler")
        return handler

    def __serve_build_asgi_app__(self) -> Starlette:
        routes = [
            Route(route.path, self.frame.wrap(handler, route), methods=list(route.methods))
            for route, handler in self.routes()
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
                running_replicas=info.replica_states.get(ReplicaState.RUNNING, 0) if info else 0,
            )
        return statuses
