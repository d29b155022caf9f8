"""`build_app(args)`: validate args, turn the plain classes into deployments, bind them.

The one module that sees both sides (ingress and model). Every serve config's `import_path` is
`serve_app.app:build_app`; the same function serves Python callers, so YAML and code share one
validation path. Replica counts, autoscaling and resources are defaults here, overridden per
deployment by a serve config's `deployments:` section.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve import Application

from serve_app.config import AppArgs, ModelConfig
from serve_app.ingress import ImagesIngress
from serve_app.model import ImageModel

logger = logging.getLogger("ray.serve")

INGRESS_NAME = "ImagesIngress"


def model_deployment_options(args: AppArgs, model: ModelConfig) -> dict:
    """Defaults for a model deployment: one replica, one CPU (and a GPU for `device: cuda`),
    room to fill two batches."""
    actor_options = {"num_cpus": 1, **({"num_gpus": 1} if model.device == "cuda" else {})}
    return {
        "num_replicas": 1,
        "ray_actor_options": actor_options,
        # Two calls' worth of requests: one running, one queued for the next call.
        "max_ongoing_requests": 2 * args.batching.max_batch_images,
        # Only what was set: an unset max_batch_images is sized to the GPU's memory.
        "user_config": args.batching.model_dump(exclude_unset=True),
        # A batch of large images can take minutes on a slow device.
        "health_check_timeout_s": 120,
        "logging_config": logging_config(args),
    }


def logging_config(args: AppArgs) -> dict:
    return {"enable_access_log": args.access_log}


def build_app(args: AppArgs | dict | None = None) -> Application:
    """Build the Images API application from `AppArgs` (or a dict of them)."""
    app_args = AppArgs.model_validate(args or {})
    model_apps = {}
    for model in app_args.models:
        options = model_deployment_options(app_args, model)
        logger.info("model deployment %s: %s", model.deployment_name, options)
        deployment = serve.deployment(ImageModel, name=model.deployment_name, **options)
        model_apps[model.id] = deployment.bind(model.model_dump())
    ingress = serve.deployment(
        serve.ingress()(ImagesIngress),
        name=INGRESS_NAME,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=256,
        logging_config=logging_config(app_args),
    )
    return ingress.bind(app_args.model_dump(), model_apps)
