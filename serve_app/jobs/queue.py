"""Where jobs queue: the Redis URL in use and Ray Serve's task processor config for it.

The builder, the ingress (which enqueues) and the consumer deployment (which runs jobs) all take
both from here, so they always agree on the broker, queue and retry policy.
"""

from __future__ import annotations

import os
from pathlib import Path

from serve_app.config import JobsConfig, cache_root, stored_secret

TASK_NAME = "run_image_job"


def embedded_dir() -> Path:
    return cache_root() / "redis"


def embedded_password() -> str:
    """The embedded Redis's password: made once, kept beside its data (mode 0600)."""
    return stored_secret(embedded_dir() / "password", 32)


def redis_url(config: JobsConfig) -> str | None:
    """`jobs.redis_url`, else `$<jobs.redis_url_env>`, else the embedded server's URL (None
    when `jobs.embedded` is off: jobs are then unavailable)."""
    if config.redis_url:
        return config.redis_url
    from_env = os.environ.get(config.redis_url_env)
    if from_env:
        return from_env
    if not config.embedded:
        return None
    return f"redis://:{embedded_password()}@127.0.0.1:{config.embedded_port}/0"


def uses_embedded(config: JobsConfig) -> bool:
    return config.embedded and not (config.redis_url or os.environ.get(config.redis_url_env))


def dead_letter_queue(config: JobsConfig) -> str:
    return f"{config.queue_name}_failed"


def task_processor_config(config: JobsConfig, url: str):
    """Celery on Redis: late acks (a job whose consumer dies is handed out again), one job
    reserved per consumer thread, bounded retries with backoff, failed jobs to a dead-letter
    queue, and a producer that gives up quickly when Redis is down (the ingress answers 503)."""
    from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig

    return TaskProcessorConfig(
        queue_name=config.queue_name,
        max_retries=config.max_retries,
        failed_task_queue_name=dead_letter_queue(config),
        unprocessable_task_queue_name=f"{config.queue_name}_unprocessable",
        adapter_config=CeleryAdapterConfig(
            broker_url=url,
            backend_url=url,
            broker_transport_options={"visibility_timeout": config.visibility_timeout_s},
            app_custom_config={
                "worker_prefetch_multiplier": 1,
                "broker_connection_retry_on_startup": True,
                "broker_connection_max_retries": None,
                "task_publish_retry_policy": {
                    "max_retries": 2,
                    "interval_start": 0.2,
                    "interval_step": 0.5,
                    "interval_max": 1,
                },
                "result_expires": config.result_ttl_s,
                "worker_hijack_root_logger": False,
            },  # fmt: skip
            task_custom_config={"retry_backoff_max": config.retry_backoff_max_s},
        ),
    )
