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

from serve_app.config import AppArgs, JobsConfig, ModelConfig
from serve_app.ingress import ImagesIngress
from serve_app.model import ImageModel

logger = logging.getLogger("ray.serve")

INGRESS_NAME = "ImagesIngress"
CONSUMER_NAME = "ImageJobConsumer"
REDIS_NAME = "EmbeddedRedis"


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


def job_deployments(args: AppArgs, model_apps: dict):
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

    jobs: JobsConfig = args.jobs
    embedded = None
    if uses_embedded(jobs):
        from serve_app.jobs.redis_server import EmbeddedRedis

        password_file = jobs.redis_password_file or str(embedded_password_file())
        jobs = jobs.model_copy(update={"redis_password_file": password_file})
        embedded = serve.deployment(
            EmbeddedRedis,
            name=REDIS_NAME,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=2,  # restarts a dead redis-server within seconds
            logging_config=logging_config(args),
        ).bind(jobs.embedded_port, password_file, str(embedded_dir()))
    url = redis_url(jobs)
    if url is None:
        logger.warning(
            "jobs: no Redis (jobs.redis_url / $%s unset, jobs.embedded off): job requests "
            "will get 503",
            jobs.redis_url_env,
        )
        return args, None
    resolved_args = args.model_copy(update={"jobs": jobs})
    policy_jobs = jobs.model_copy(update={"embedded": embedded is not None})
    consumer = serve.deployment(
        task_consumer(task_processor_config=task_processor_config(jobs, url))(ImageJobConsumer),
        name=CONSUMER_NAME,
        ray_actor_options={"num_cpus": 0},  # it forwards jobs; the model replicas compute
        max_ongoing_requests=16,  # jobs in flight per consumer: enough to fill batches
        graceful_shutdown_timeout_s=300,  # running jobs finish before a replica goes
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 16,
            "policy": {
                "policy_function": "serve_app.jobs.queue_policy:JobQueuePolicy",
                # Where the controller runs, only the embedded server's file or the env var.
                "policy_kwargs": {
                    "jobs": policy_jobs.model_dump(mode="json"),
                    "poll_interval_s": 5,
                },
            },
        },
        logging_config=logging_config(args),
    )
    return resolved_args, consumer.bind(resolved_args.model_dump(), model_apps, embedded)


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
    consumer = None
    if app_args.jobs.enabled:
        app_args, consumer = job_deployments(app_args, model_apps)
    return ingress.bind(app_args.model_dump(), model_apps, job_consumer=consumer)
