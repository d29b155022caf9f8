"""The job consumer's autoscaling policy: Ray's queue-length policy, with the broker URL
resolved in Ray's controller rather than passed to it.

Ray Serve logs a policy's kwargs and shows them in `serve status`, so they carry the secret-free
`JobsConfig`; the password comes from the env var or the 0600 password file it names
(`queue.redis_url`), read where the policy runs.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy

from serve_app.config import JobsConfig
from serve_app.jobs.queue import redis_url

logger = logging.getLogger("ray.serve")


class JobQueuePolicy(AsyncInferenceAutoscalingPolicy):
    """Scales consumers on the jobs queue's length plus their ongoing jobs (Ray's policy)."""

    def __init__(self, jobs: dict[str, Any], poll_interval_s: float = 5.0) -> None:
        self._jobs = JobsConfig.model_validate(jobs)
        self._resolved = False
        super().__init__(
            broker_url="", queue_name=self._jobs.queue_name, poll_interval_s=poll_interval_s
        )

    def _ensure_broker(self) -> None:
        if not self._resolved:
            self._resolved = True
            try:
                self._broker_url = redis_url(self._jobs) or ""
            except OSError as exc:  # the password file is not on this node
                logger.warning("jobs autoscaling: cannot read the Redis password: %s", exc)
            if not self._broker_url:
                logger.warning(
                    "jobs autoscaling: no Redis URL where the controller runs ($%s): consumers "
                    "scale on their ongoing jobs only",
                    self._jobs.redis_url_env,
                )
        if self._broker_url:
            super()._ensure_broker()

    async def _poll_once(self) -> None:
        if self._broker is not None:
            await super()._poll_once()
