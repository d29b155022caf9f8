"""Work units and the work-based autoscaling policy (pure: no Ray)."""

from types import SimpleNamespace

import pytest

from serve_app.autoscaling import WorkPolicy, desired_replicas, request_work
from tests.conftest import make_job


def test_work_weights_image_steps_by_tokens():
    heavy = make_job(width=1024, height=1024, steps=28, seeds=tuple(range(8)))
    light = make_job(width=256, height=256, steps=4, seeds=(0,))
    assert request_work(heavy) == 8 * 28  # units: steps of one 1024x1024 text-to-image image
    assert request_work(heavy) / request_work(light) > 100  # the "~100x": more, with text
    edit = make_job(width=1024, height=1024, steps=28, conditioning=(object(),))
    assert request_work(edit) / request_work(
        make_job(width=1024, height=1024, steps=28)
    ) == pytest.approx((2 * 4096 + 512) / (4096 + 512))
    assert request_work(heavy, steps_left=7) == request_work(heavy) / 4


def test_desired_replicas_cover_the_work_within_bounds():
    assert desired_replicas(0, 100, 1, 4) == 1
    assert desired_replicas(250, 100, 1, 4) == 3
    assert desired_replicas(10_000, 100, 1, 4) == 4
    assert desired_replicas(0, 100, 0, 4) == 0


def test_policy_sums_queued_and_running_work_over_replicas():
    policy = WorkPolicy(target_work_per_replica=100)
    ctx = SimpleNamespace(
        aggregated_metrics={
            "queued_work": {"r1": 120.0, "r2": 60.0},
            "running_work": {"r1": 30.0, "r2": 0.0},
        },
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=5,
    )
    assert policy(ctx) == (3, {"work": 210.0})
    # Requests waiting in the handles (past max_ongoing_requests) count at the average work of
    # those at the replicas: 210 units over 6 requests, 6 more waiting -> 420 -> 5 replicas.
    queued = SimpleNamespace(**vars(ctx), total_queued_requests=6, total_running_requests=6)
    assert policy(queued) == (5, {"work": 420.0})
    unknown = SimpleNamespace(
        aggregated_metrics={}, total_queued_requests=3, total_running_requests=0,
        current_num_replicas=1, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=5,
    )  # fmt: skip
    assert policy(unknown)[0] == 2
    idle = SimpleNamespace(
        aggregated_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=5
    )
    assert policy(idle) == (1, {"work": 0})
    with pytest.raises(ValueError):
        WorkPolicy(target_work_per_replica=0)
