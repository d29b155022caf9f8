"""Autoscaling on denoising work, not request counts.

Serve's default policy counts ongoing requests, but a request for 8 images at 1024x1024 and 28
steps is ~100x the work of one 256x256 image at 4 steps. Each model replica reports the work it
holds (`record_autoscaling_stats`: queued and running, in work units) and `WorkPolicy` scales the
deployment toward `target_work_per_replica` units per replica.

A work unit is one denoising step of one 1024x1024 text-to-image image: image-steps weighted by
the tokens the transformer sees (image tokens, an edit's conditioning tokens, the text context).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from serve_app.contract import ModelRequest
from serve_app.geometry import image_tokens

REFERENCE_TOKENS = image_tokens(1024, 1024) + 512  # one 1024x1024 text-to-image image-step
WORK_METRICS = ("queued_work", "running_work")


def request_work(
    request: ModelRequest, text_tokens: int = 512, steps_left: int | None = None
) -> float:
    """Work units of a request's images over `steps_left` (default: all) of its steps."""
    tokens = (
        image_tokens(request.width, request.height) * (1 + len(request.conditioning)) + text_tokens
    )
    steps = request.steps if steps_left is None else steps_left
    return request.n * steps * tokens / REFERENCE_TOKENS


def total_work(requests: Iterable[ModelRequest], text_tokens: int = 512) -> float:
    return sum(request_work(request, text_tokens) for request in requests)


def desired_replicas(work: float, target: float, minimum: int, maximum: int) -> int:
    """Enough replicas that each holds at most `target` units, within [minimum, maximum]."""
    wanted = math.ceil(work / target) if work > 0 else 0
    return max(minimum, min(maximum, wanted))


class WorkPolicy:
    """A Ray Serve custom autoscaling policy (`autoscaling_config.policy.policy_function:
    serve_app.autoscaling:WorkPolicy`, `policy_kwargs: {target_work_per_replica: ...}`): the
    replicas' reported queued + running work over the target per replica. Serve still applies
    the config's up/downscale delays and replica bounds."""

    def __init__(self, target_work_per_replica: float = 200.0) -> None:
        if target_work_per_replica <= 0:
            raise ValueError("target_work_per_replica must be positive")
        self.target = target_work_per_replica

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reported = sum(sum(ctx.aggregated_metrics.get(name, {}).values()) for name in WORK_METRICS)
        # Requests past the replicas' max_ongoing_requests wait in the handles, unreported:
        # count them at the replicas' average work per request.
        waiting = getattr(ctx, "total_queued_requests", 0) or 0
        at_replicas = max(getattr(ctx, "total_running_requests", 0) or 0, 1)
        work = reported + waiting * reported / at_replicas
        replicas = desired_replicas(
            work,
            self.target,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
        if waiting and not reported:  # queued work of unknown size: at least one more replica
            replicas = min(
                max(replicas, ctx.current_num_replicas + 1), ctx.capacity_adjusted_max_replicas
            )
        return replicas, {"work": work}
