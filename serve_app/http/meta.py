"""The routes around the images API: models, signed image files, health and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serve_app.adapters import AdapterRegistry, check_name
from serve_app.config import AppArgs
from serve_app.contract import APIError
from serve_app.families import traits
from serve_app.http.responses import signed_file
from serve_app.openapi import openapi_document
from serve_app.protocol import ModelCard, ModelLimits, ModelList, shown
from serve_app.storage import ImageStore

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ModelStatus:
    """A model deployment as Serve reports it: HEALTHY, UPSCALING, UPDATING, ..., and how many
    of its replicas are running."""

    status: str
    running_replicas: int


# Model id -> its deployment's status.
StatusProbe = Callable[[], dict[str, ModelStatus]]
# None when asynchronous jobs can be submitted now; else why not.
JobsProbe = Callable[[], Awaitable[str | None]]


class MetaRoutes:
    def __init__(
        self,
        args: AppArgs,
        store: ImageStore,
        statuses: StatusProbe,
        adapters: dict[str, AdapterRegistry],
        jobs: JobsProbe | None = None,
    ) -> None:
        self.jobs = jobs
        self.model_ids = [model.id for model in args.models]
        self.families = {model.id: traits(model.family) for model in args.models}
        self.limits = {
            model.id: ModelLimits(
                min_side=model.min_side,
                max_side=model.max_side,
                max_pixels=model.max_pixels,
                max_n=args.max_n,
                default_size=model.default_size,
                sizes=model.preferred_resolutions,
                quality_steps=model.quality_steps.model_dump(),
                masked_edits=traits(model.family).masked_edits,
                multi_image_edits=traits(model.family).multi_image_edits,
            )
            for model in args.models
        }
        self.adapters = {model_id: r for model_id, r in adapters.items() if r.enabled}
        self.store = store
        self.statuses = statuses
        self.created = int(time.time())
        self._openapi = openapi_document(args)

    async def list_models(self, request: Request) -> Response:
        """Each model, then each of its LoRA adapters as `<model>:<adapter>`."""
        adapters = await asyncio.to_thread(self._adapter_names)
        cards = []
        for model_id in self.model_ids:
            cards.append(self._card(model_id))
            cards += [self._card(model_id, name) for name in adapters.get(model_id, [])]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def get_model(self, request: Request) -> Response:
        model_id = request.path_params["model"]
        if model_id in self.model_ids:
            return JSONResponse(self._card(model_id).model_dump())
        base, colon, adapter = model_id.rpartition(":")
        registry = self.adapters.get(base) if colon else None
        if registry is not None and await asyncio.to_thread(
            registry.exists, check_name(adapter, "model")
        ):
            return JSONResponse(self._card(base, adapter).model_dump())
        raise APIError(
            f"The model {shown(model_id)} does not exist.",
            status=404,
            param="model",
            code="model_not_found",
        )

    def _card(self, model_id: str, adapter: str | None = None) -> ModelCard:
        family = self.families[model_id]
        return ModelCard(
            id=model_id if adapter is None else f"{model_id}:{adapter}",
            created=self.created,
            family=family.name,
            endpoints=list(family.endpoints),
            limits=self.limits[model_id],
            parent=None if adapter is None else model_id,
        )

    def _adapter_names(self) -> dict[str, list[str]]:
        names = {}
        for model_id, registry in self.adapters.items():
            try:
                names[model_id] = registry.names()
            except Exception as exc:  # noqa: BLE001 - list the models even if S3 is down
                logger.warning("cannot list adapters of %s: %s", model_id, exc)
        return names

    async def get_file(self, request: Request) -> Response:
        """A `url` image behind its signed link (local storage; S3 links point at the bucket)."""
        return await signed_file(self.store, request)

    async def health(self, request: Request) -> Response:
        """Readiness: 200 when every model can serve now (at least one running replica), also
        while its deployment scales or updates; 503 `not_ready` otherwise. Liveness is Ray
        Serve's own `/-/healthz` on the proxy. Asynchronous jobs that cannot be submitted make
        it 200 `degraded` with the reason: synchronous requests still work, and every replica
        shares the same Redis, so taking this one out of a load balancer would not help."""
        statuses = await asyncio.to_thread(self.statuses)
        not_ready = [model for model, s in statuses.items() if s.running_replicas < 1]
        body = {
            model: {"status": s.status, "running_replicas": s.running_replicas}
            for model, s in statuses.items()
        }
        if not_ready:
            raise APIError(
                f"No running replica for model(s) {', '.join(not_ready)}: {body}.",
                status=503,
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        health: dict = {"status": "ok", "models": body}
        if self.jobs is not None:
            reason = await self.jobs()
            health["jobs"] = (
                {"status": "unavailable", "reason": reason} if reason else {"status": "ok"}
            )
            health["status"] = "degraded" if reason else "ok"
        return JSONResponse(health)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._openapi)
