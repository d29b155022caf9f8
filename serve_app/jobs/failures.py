"""What a failure means for a job: the machinery's (retry it) or the request's own (fail it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from serve_app.contract import APIError, ReplicaUnavailable

T = TypeVar("T")


def replica_lost(exc: BaseException) -> bool:
    """Whether a failure is the serving machinery's (a replica or node died, Redis is away):
    worth a retry. Anything else is a bug in the request's path: it fails the job at once."""
    import redis
    from ray import exceptions as ray_errors
    from ray.serve import exceptions as serve_errors

    lost = (
        ray_errors.RayActorError,  # incl. ActorDiedError, ActorUnavailableError
        ray_errors.WorkerCrashedError,
        ray_errors.NodeDiedError,
        ray_errors.OwnerDiedError,
        ray_errors.ObjectLostError,
        ray_errors.LocalRayletDiedError,
        ray_errors.OutOfMemoryError,
        serve_errors.ReplicaUnavailableError,
        serve_errors.DeploymentUnavailableError,
        redis.ConnectionError,
        redis.TimeoutError,
    )
    return isinstance(exc, lost) or isinstance(api_error(exc), ReplicaUnavailable)


def api_error(exc: BaseException) -> APIError | None:
    """An APIError, also when Ray delivers it wrapped (raised in the model replica)."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, APIError) else None


def with_redis(call: Callable[[], T], attempts: int = 60) -> T:
    """Run a Redis call, waiting out a Redis restart (up to a minute)."""
    import redis

    for attempt in range(attempts):
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")
