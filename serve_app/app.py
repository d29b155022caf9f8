"""`build_app(args)`: validate args, turn the plain classes into deployments, bind them.

The one module that sees both sides (ingress and model). Every serve config's `import_path` is
`serve_app.app:build_app`; the same function serves Python callers, so YAML and code share one
validation path. Each deployment class declares its own options (`deployment_options`: name,
replicas, resources, timeouts), the way Ray Serve LLM's `LLMServer.get_deployment_options` does;
a serve config's `deployments:` section overrides them per deployment.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.config import AppArgs, ModelConfig
from serve_app.ingress import ImagesIngress
from serve_app.model import ImageModel

logger = logging.getLogger("ray.serve")


def model_deployment_options(args: AppArgs, model: ModelConfig) -> dict[str, Any]:
    """`ImageModel.deployment_options` (tests call it by this name)."""
    return ImageModel.deployment_options(args, model)


def job_deployments(
    args: AppArgs, model_apps: dict[str, Application]
) -> tuple[AppArgs, Application | None]:
    """The job consumer (Ray Serve task consumer; scales on the queue's length with Ray's
    async-inference policy) and, for `serve run`, the embedded Redis it and the ingress use.

    No Redis password goes through Ray: Ray's controller logs deployment arguments and policy
    kwargs and shows them in `serve status`. Each process resolves the URL itself
    (`queue.redis_url`) from the env var or a 0600 password file; for the embedded server the
    file's absolute path is fixed here, so every process of the machine, the controller
    included, reads the same one."""
    from ray.serve.task_consumer import task_consumer

    from serve_app.jobs.consumer import ImageJobConsumer
    from serve_app.jobs.queue import (
        embedded_dir,
        embedded_password_file,
        redis_url,
        task_processor_config,
        uses_embedded,
    )

    jobs = args.jobs
    embedded: Application | None = None
    if uses_embedded(jobs):
        from serve_app.jobs.redis_server import EmbeddedRedis

        password_file = jobs.redis_password_file or str(embedded_password_file())
        jobs = jobs.model_copy(update={"redis_password_file": password_file})
        redis = serve.deployment(**EmbeddedRedis.deployment_options(args))(EmbeddedRedis)
        embedded = redis.bind(jobs.embedded_port, password_file, str(embedded_dir()))
    url = redis_url(jobs)
    if url is None:
        logger.warning(
            "jobs: no Redis (jobs.redis_url / $%s unset, jobs.embedded off): job requests "
            "will get 503",
            jobs.redis_url_env,
        )
        return args, None
    resolved_args = args.model_copy(update={"jobs": jobs})
    # What the autoscaling policy gets, where the controller runs: only the embedded server's
    # file or the env var.
    policy_args = args.model_copy(
        update={"jobs": jobs.model_copy(update={"embedded": embedded is not None})}
    )
    consumer_cls = task_consumer(task_processor_config=task_processor_config(jobs, url))(
        ImageJobConsumer
    )
    consumer = serve.deployment(**ImageJobConsumer.deployment_options(policy_args))(consumer_cls)
    return resolved_args, consumer.bind(resolved_args.model_dump(), model_apps, embedded)


def parallel_capacity_problem(options: dict[str, Any], nodes: list[dict]) -> str | None:
    """Why no node of the cluster as it is now can hold one replica's placement group (all
    of its bundles on one node), or None. Only a warning: an autoscaler may add such a node."""
    bundles = options.get("placement_group_bundles")
    if not bundles:
        return None
    needed: dict[str, float] = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            needed[resource] = needed.get(resource, 0) + amount
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
    if any(all(node.get(k, 0) >= v for k, v in needed.items()) for node in alive):
        return None
    largest = max((node.get("GPU", 0) for node in alive), default=0)
    return (
        f"deployment {options['name']}: one replica needs {needed} on one node "
        f"({len(bundles)} parallel ranks); no node has that now (most GPUs on a node: "
        f"{largest:g}). Its replicas stay pending until one joins."
    )


def _warn_if_no_node_fits(options: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        problem = parallel_capacity_problem(options, ray.nodes())
        if problem:
            logger.warning(problem)


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    """Build the Images API application from `AppArgs` (or a dict of them)."""
    app_args = AppArgs.model_validate(args or {})
    model_apps = {}
    for model in app_args.models:
        options = ImageModel.deployment_options(app_args, model)
        logger.info("model deployment %s: %s", model.deployment_name, options)
        _warn_if_no_node_fits(options)
        deployment = serve.deployment(**options)(ImageModel)
        model_apps[model.id] = deployment.bind(model.model_dump())
    ingress = serve.deployment(**ImagesIngress.deployment_options(app_args))(
        serve.ingress()(ImagesIngress)
    )
    consumer = None
    if app_args.jobs.enabled:
        app_args, consumer = job_deployments(app_args, model_apps)
    return ingress.bind(app_args.model_dump(), model_apps, job_consumer=consumer)
