"""Job metrics (exported through Ray like the others): jobs by status, the queue length, time
queued and time running, webhook deliveries by outcome, retries."""

from __future__ import annotations

from serve_app.metrics import LATENCY_BUCKETS_S, _make

QUEUE_BUCKETS_S = [*LATENCY_BUCKETS_S, 600, 1800, 3600]


class JobMetrics:
    def __init__(self) -> None:
        self.jobs = _make(
            "Counter",
            "serve_app_jobs",
            "Jobs by what happened to them: submitted, started, completed, failed, cancelled.",
            ("status",),
        )
        self.queue_length = _make(
            "Gauge", "serve_app_jobs_queued", "Jobs waiting for a consumer.", ()
        )
        self.queued_s = _make(
            "Histogram",
            "serve_app_job_queued_seconds",
            "Time from submission to a consumer starting the job.",
            (),
            boundaries=QUEUE_BUCKETS_S,
        )
        self.running_s = _make(
            "Histogram",
            "serve_app_job_running_seconds",
            "Time a consumer spent on one attempt of a job.",
            (),
            boundaries=QUEUE_BUCKETS_S,
        )
        self.webhooks = _make(
            "Counter",
            "serve_app_webhook_deliveries",
            "Webhook events by outcome: delivered, failed (attempts exhausted), refused.",
            ("outcome",),
        )
        self.retries = _make(
            "Counter", "serve_app_job_retries", "Job attempts retried after a model failure.", ()
        )

    def started(self, queued_s: float) -> None:
        self.jobs.inc(tags={"status": "started"})
        self.queued_s.observe(max(0.0, queued_s))

    def finished(self, status: str) -> None:
        self.jobs.inc(tags={"status": status})

    def webhook_outcome(self, outcome: str) -> None:
        self.webhooks.inc(tags={"outcome": outcome})
