"""Asynchronous jobs: the Redis broker, the queue's bounds, consumer timings and webhooks."""

from __future__ import annotations

from pydantic import Field, model_validator

from serve_app.config.base import StrictModel

REQUEUE_S = 10  # what a stopping consumer keeps, after draining, to requeue its unfinished jobs


class WebhookConfig(StrictModel):
    """Where finished jobs may be POSTed, and how the deliveries are signed."""

    secret_env: str = Field(
        default="SERVE_APP_WEBHOOK_SECRET",
        description="Environment variable holding the signing secret (Standard Webhooks: "
        "`whsec_` + base64, or any text); its key must be at least 24 bytes, else the app "
        "fails to start naming the variable. Unset: `webhook_url` is refused.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a `webhook_url` may name (`example.com`, `*.example.com`); empty: "
        "any host with a public address.",
    )
    allow_private: bool = Field(
        default=False,
        description="Allow private, loopback and link-local addresses (tests, a private "
        "network). Off: such destinations are refused at submission and again at delivery.",
    )
    timeout_s: float = Field(
        default=10,
        gt=0,
        le=120,
        description="Deadline of one delivery attempt, all of it (connect, send, the answer's "
        "status line and headers); a slower receiver fails the attempt, which is retried.",
    )
    workers: int = Field(default=4, ge=1, le=64, description="Delivery threads per replica.")
    max_per_host: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Delivery attempts in flight at once to one host (the URL's host name, "
        "any port); more wait their turn, so a slow host cannot hold every delivery thread.",
    )
    max_attempts: int = Field(
        default=5, ge=1, le=20, description="Attempts per event, with exponential backoff from 1 s."
    )


class JobsConfig(StrictModel):
    """Asynchronous jobs (`Prefer: respond-async`): Ray Serve task consumers on Redis."""

    enabled: bool = Field(
        default=True, description="Serve `Prefer: respond-async` and `/v1/images/jobs`."
    )
    redis_url: str | None = Field(
        default=None,
        description="Broker, result store and job state. Unset: `$<redis_url_env>` if set, "
        "else an embedded `redis-server` the app starts (data under the cache directory).",
    )
    redis_url_env: str = Field(
        default="SERVE_APP_REDIS_URL",
        description="Environment variable read when `redis_url` is unset.",
    )
    redis_password_file: str | None = Field(
        default=None,
        description="A file holding the Redis password (e.g. a mounted Kubernetes secret), "
        "used when the URL has none; keeps the password out of configs and of what Ray logs. "
        "With the embedded Redis, the app points it at that server's own file.",
    )
    embedded: bool = Field(
        default=True,
        description="With no URL, start a local `redis-server` (one machine: `serve run`). "
        "Turn off on clusters: with no URL, job requests then get 503 saying what to set.",
    )
    embedded_port: int = Field(
        default=6390, ge=1, le=65535, description="Port of the embedded Redis on 127.0.0.1."
    )
    queue_name: str = Field(default="serve_app_images", min_length=1, description="Celery queue.")
    max_queued: int = Field(
        default=1000,
        ge=1,
        description="Most jobs waiting for the model (submitted, not yet started on it: in the "
        "queue or taken by a consumer); a submission past it gets 429 `queue_full` + Retry-After.",
    )
    max_queued_per_key: int | None = Field(
        default=None,
        ge=1,
        description="Most of those one API key may have (with auth off, all requests share one "
        "key); past it 429 `queue_full`. Unset: only `max_queued` applies.",
    )
    result_ttl_s: int = Field(
        default=24 * 3600, ge=60, description="How long a finished job and its images are kept."
    )
    max_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of a job whose model replica failed mid-call."
    )
    retry_backoff_max_s: int = Field(
        default=30, ge=1, le=600, description="Longest wait before a retry (exponential from 1 s)."
    )
    visibility_timeout_s: int = Field(
        default=900,
        ge=10,  # and longer than a heartbeat takes to go stale: `_check_timings`
        description="A job taken by a consumer that died is handed out again after this long "
        "(Redis broker); a job running longer is not run twice (heartbeats).",
    )
    heartbeat_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often a consumer marks the jobs it runs as alive (and stores their "
        "progress).",
    )
    stale_s: float = Field(
        default=6.0,
        gt=0,
        description="A running job whose heartbeat is this old lost its consumer: it may run "
        "again. At least 3 x `heartbeat_s`, and at most `visibility_timeout_s` - 2 x "
        "`heartbeat_s`.",
    )
    drain_s: float = Field(
        default=240,
        ge=0,
        description="How long a stopping consumer waits for the jobs it runs to finish before "
        "putting the rest back in the queue. At least 10 s under `graceful_shutdown_s`.",
    )
    graceful_shutdown_s: float = Field(
        default=300,
        gt=0,
        description="The consumer deployment's `graceful_shutdown_timeout_s`: how long Ray "
        "Serve lets a stopping consumer replica finish before killing it.",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Longest a job may run, counted from when its model accepts it (time in "
        "the jobs queue does not count); past it the model's work stops and the job fails with "
        "`job_timeout`. Unset: `limits.request_timeout_s`, as for a synchronous request.",
    )
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig, description="Webhooks.")

    @model_validator(mode="after")
    def _check_timings(self) -> JobsConfig:
        if self.stale_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"jobs.stale_s ({self.stale_s:g} s) must be at least 3 x jobs.heartbeat_s "
                f"({self.heartbeat_s:g} s): a consumer that misses a heartbeat or two (a busy "
                "thread, a slow Redis) must not have its running jobs taken for lost and run twice"
            )
        if self.drain_s > self.graceful_shutdown_s - REQUEUE_S:
            raise ValueError(
                f"jobs.drain_s ({self.drain_s:g} s) must be at least {REQUEUE_S} s less than "
                f"jobs.graceful_shutdown_s ({self.graceful_shutdown_s:g} s): a stopping consumer "
                "needs that time to put the jobs still running back in the queue before Ray "
                "Serve kills it"
            )
        least = self.stale_s + 2 * self.heartbeat_s
        if self.visibility_timeout_s < least:
            raise ValueError(
                f"jobs.visibility_timeout_s ({self.visibility_timeout_s} s) must be at least "
                f"jobs.stale_s + 2 x jobs.heartbeat_s ({least:g} s): a job handed out again "
                "because its consumer died must find that consumer's heartbeat already stale, "
                "or it is set aside as still running and waits another round"
            )
        return self
