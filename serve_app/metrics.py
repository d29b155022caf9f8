"""Prometheus metrics through `ray.serve.metrics` (exported at Ray's metrics port, `ray_` prefix).

Ray Serve already exports request counts and latencies per deployment; these add what is specific
to image generation, batching included (`serve_app_images_per_call`). Outside a Ray cluster every
metric is a no-op.
"""

from __future__ import annotations

from typing import Any

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]
IMAGES_PER_CALL_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]


class _NoMetric:
    def inc(self, *args: Any, **kwargs: Any) -> None: ...

    def set(self, *args: Any, **kwargs: Any) -> None: ...

    def observe(self, *args: Any, **kwargs: Any) -> None: ...


def _make(kind: str, name: str, description: str, tag_keys: tuple[str, ...], **kwargs: Any):
    try:
        from ray.serve import metrics

        return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys, **kwargs)
    except Exception:  # noqa: BLE001 - not in a Ray process (unit tests)
        return _NoMetric()


class IngressMetrics:
    """Per-request metrics, tagged by endpoint, model, status and API key *name*."""

    def __init__(self) -> None:
        tags = ("endpoint", "model", "status", "key")
        self.requests = _make("Counter", "serve_app_requests", "HTTP requests answered.", tags)
        self.latency = _make(
            "Histogram",
            "serve_app_request_seconds",
            "End-to-end request time in the ingress.",
            ("endpoint", "model"),
            boundaries=LATENCY_BUCKETS_S,
        )
        self.images = _make(
            "Counter", "serve_app_images", "Images returned.", ("endpoint", "model")
        )
        self.tokens_in = _make(
            "Counter", "serve_app_input_tokens", "Input tokens (text + image).", ("model",)
        )
        self.tokens_out = _make(
            "Counter", "serve_app_output_tokens", "Output (image) tokens.", ("model",)
        )
        self.rejected = _make(
            "Counter",
            "serve_app_rejected_requests",
            "Requests refused before any work: auth, backpressure, limits.",
            ("reason",),
        )


class ModelMetrics:
    """Per-model replica metrics: queueing, pipeline time, progress."""

    def __init__(self, model_id: str) -> None:
        tags = ("model",)
        self.queue_wait = _make(
            "Histogram",
            "serve_app_queue_wait_seconds",
            "Time from a request reaching the replica to its pipeline call starting.",
            tags,
            boundaries=LATENCY_BUCKETS_S,
        )
        self.seconds_per_image = _make(
            "Histogram",
            "serve_app_pipeline_seconds_per_image",
            "Pipeline call time divided by the images it produced.",
            tags,
            boundaries=LATENCY_BUCKETS_S,
        )
        self.images_per_call = _make(
            "Histogram",
            "serve_app_images_per_call",
            "Images in each pipeline call (how well batching fills calls).",
            tags,
            boundaries=IMAGES_PER_CALL_BUCKETS,
        )
        self.steps = _make(
            "Counter", "serve_app_denoising_steps", "Denoising steps run, per image.", tags
        )
        self.progress = _make(
            "Gauge",
            "serve_app_pipeline_progress",
            "Fraction of the denoising steps done by the pipeline call running now.",
            tags,
        )
        self.queued_work = _make(
            "Gauge",
            "serve_app_queued_work",
            "Denoising work waiting in this replica's queue, in work units (one step of one "
            "1024x1024 text-to-image image; serve_app/autoscaling.py).",
            tags,
        )
        self.estimated_wait = _make(
            "Gauge",
            "serve_app_estimated_wait_seconds",
            "Queued and running work over the replica's measured work rate: how long a new "
            "request would wait before its own call starts.",
            tags,
        )
        adapter_tags = ("model", "adapter")
        self.adapter_loads = _make(
            "Counter", "serve_app_adapter_loads", "LoRA adapters loaded.", adapter_tags
        )
        self.adapter_evictions = _make(
            "Counter",
            "serve_app_adapter_evictions",
            "LoRA adapters unloaded because their set was the least recently used.",
            adapter_tags,
        )
        self.adapter_requests = _make(
            "Counter", "serve_app_adapter_requests", "Requests per LoRA adapter.", adapter_tags
        )
        self.adapter_load_seconds = _make(
            "Histogram",
            "serve_app_adapter_load_seconds",
            "Time to load one LoRA adapter (download, read, inject).",
            tags,
            boundaries=LATENCY_BUCKETS_S,
        )
        self.moderation_refusals = _make(
            "Counter",
            "serve_app_moderation_refusals",
            "Requests refused by moderation, by check (blocked_terms, text_classifier, "
            "input_image, output_image, preview).",
            ("model", "check"),
        )
        self.moderation_seconds = _make(
            "Histogram",
            "serve_app_moderation_seconds",
            "Time of one batched moderation check (prompt, input or output images).",
            ("model", "stage"),
            boundaries=LATENCY_BUCKETS_S,
        )
        for metric in (
            self.moderation_refusals,
            self.moderation_seconds,
            self.adapter_loads,
            self.adapter_evictions,
            self.adapter_requests,
            self.adapter_load_seconds,
            self.queue_wait,
            self.seconds_per_image,
            self.images_per_call,
            self.steps,
            self.progress,
            self.queued_work,
            self.estimated_wait,
        ):
            if hasattr(metric, "set_default_tags"):
                metric.set_default_tags({"model": model_id})
