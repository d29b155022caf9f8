"""Where jobs queue: the Redis URL in use and Ray Serve's task processor config for it.

The builder, the ingress (which enqueues) and the consumer deployment (which runs jobs) all take
both from here, so they always agree on the broker, queue and retry policy.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from serve_app.cache import redis_dir, redis_password_file, stored_secret
from serve_app.config import JobsConfig

TASK_NAME = "run_image_job"


def embedded_dir() -> Path:
    return redis_dir()


def embedded_password_file() -> Path:
    """The embedded Redis's password: made once, kept beside its data (mode 0600)."""
    path = redis_password_file()
    stored_secret(path, 32)
    return path


def redis_url(config: JobsConfig) -> str | None:
    """The Redis URL with its password, resolved in the process that uses it: `jobs.redis_url`,
    else `$<jobs.redis_url_env>`, else the embedded server's (None when `jobs.embedded` is off:
    jobs are then unavailable). A URL without a password takes `jobs.redis_password_file`'s.

    Never pass the result through Ray (deployment args, autoscaling policy kwargs): Ray's
    controller logs and shows those. Pass the `JobsConfig`, which holds no password unless an
    operator wrote one into `redis_url`."""
    url = config.redis_url or os.environ.get(config.redis_url_env)
    password_file = config.redis_password_file
    if not url:
        if not config.embedded:
            return None
        url = f"redis://127.0.0.1:{config.embedded_port}/0"
        password_file = password_file or str(embedded_password_file())
    if password_file:
        url = with_password(url, Path(password_file).expanduser().read_text().strip())
    return url


def with_password(url: str, password: str) -> str:
    """`url` with `password`, unless it already has one."""
    parts = urlsplit(url)
    if parts.password or not password:
        return url
    user = quote(parts.username or "", safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc}"))


def redacted(url: str) -> str:
    """`url` with its password replaced by `***`, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


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
