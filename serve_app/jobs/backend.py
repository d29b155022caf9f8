"""What both sides of the jobs wing (the ingress's job routes and the consumer) work with, built
once per process from the app's args: the job store, the job image store, metrics, webhooks."""

from __future__ import annotations

import dataclasses
from typing import Any

from serve_app.config import AppArgs, JobsConfig
from serve_app.jobs.metrics import JobMetrics
from serve_app.jobs.queue import redis_url
from serve_app.jobs.store import JobStore
from serve_app.jobs.webhooks import WebhookSender
from serve_app.storage import ImageStore, make_job_store, url_secret


class NoRedis:
    """The job store when no Redis is configured: every use says what to set."""

    def __init__(self, env: str) -> None:
        self.env = env

    def __getattr__(self, name: str) -> Any:
        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionError(f"no Redis is configured for jobs: set ${self.env}")

        return unavailable


@dataclasses.dataclass
class JobBackend:
    config: JobsConfig
    url: str | None  # None: no Redis configured (every job route answers 503)
    store: JobStore
    images: ImageStore
    metrics: JobMetrics
    webhooks: WebhookSender
    public_base_url: str | None = None

    @classmethod
    def from_args(cls, args: AppArgs) -> JobBackend:
        config = args.jobs
        url = redis_url(config)
        store: Any = (
            JobStore(
                url,
                config.result_ttl_s,
                config.max_queued,
                config.max_queued_per_key,
                stale_s=config.stale_s,
            )  # fmt: skip
            if url
            else NoRedis(config.redis_url_env)
        )
        metrics = JobMetrics()
        return cls(
            config=config,
            url=url,
            store=store,
            images=make_job_store(args.storage, config.result_ttl_s, url_secret(args.storage)),
            metrics=metrics,
            webhooks=WebhookSender(config.webhooks, metrics.webhook_outcome),
            public_base_url=args.storage.public_base_url,
        )
