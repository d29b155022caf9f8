"""Pure batching policy: grouping compatible jobs, counting images, splitting big requests."""

import pytest
from PIL import Image

from serve_app.batching import call_is_full, count_images, next_call, split_request
from tests.conftest import make_job


def job(name="r", width=256, height=256, steps=4, guidance=2.5, seeds=(1,), conditioning=()):
    return make_job(
        request_id=name,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seeds=tuple(seeds),
        conditioning=conditioning,
    )


def test_count_images_sums_n():
    assert count_images([job(seeds=(1, 2, 3)), job(seeds=(4,))]) == 4


def drain(jobs, max_images=8):
    """Apply next_call until nothing waits: the calls, as request names."""
    waiting, calls = list(jobs), []
    while waiting:
        taken = next_call(waiting, max_images)
        calls.append([waiting[i].request_id for i in taken])
        waiting = [job for i, job in enumerate(waiting) if i not in taken]
    return calls


def test_compatible_jobs_share_a_call_in_arrival_order():
    jobs = [job("a"), job("b", width=512), job("c"), job("d", steps=8), job("e", width=512)]
    assert drain(jobs) == [["a", "c"], ["b", "e"], ["d"]]


def test_a_call_holds_at_most_max_images_and_the_oldest_always_goes():
    jobs = [job("a", seeds=(1, 2, 3)), job("b", seeds=(4, 5, 6)), job("c", seeds=(7, 8, 9))]
    assert drain(jobs, max_images=8) == [["a", "b"], ["c"]]
    assert drain([job("big", seeds=range(5))], max_images=4) == [["big"]]
    assert next_call([], 8) == []


def test_a_call_is_full_only_when_its_group_reaches_max_images():
    assert call_is_full([job(seeds=(1, 2)), job(seeds=(3, 4))], 4)
    assert not call_is_full([job(seeds=(1, 2)), job(width=512, seeds=(3, 4))], 4)


@pytest.mark.parametrize(
    "other",
    [
        job(width=512),
        job(height=512),
        job(steps=8),
        job(guidance=3.5),
        job(conditioning=(Image.new("RGB", (64, 64)),)),
    ],
)
def test_any_geometry_difference_splits_calls(other):
    assert next_call([job(), other], 8) == [0]


def test_masked_edits_never_share_a_call_with_plain_edits():
    canvas = (Image.new("RGB", (64, 64)),)
    plain = job("p1", conditioning=canvas)
    masked = make_job(**{**plain.__dict__, "request_id": "m", "mask": Image.new("L", (256, 256))})
    assert drain([plain, masked, job("p2", conditioning=canvas)]) == [["p1", "p2"], ["m"]]


def test_conditioning_with_same_shape_shares_a_call():
    a = job(conditioning=(Image.new("RGB", (64, 32)),))
    b = job(conditioning=(Image.new("RGB", (64, 32), "red"),))
    assert next_call([a, b], 8) == [0, 1]


def test_split_keeps_every_seed_and_image_index_in_order():
    chunks = split_request(job(seeds=range(10)), 4)
    assert [c.seeds for c in chunks] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [c.first_image_index for c in chunks] == [0, 4, 8]
    assert all(c.request_id == "r" and c.width == 256 for c in chunks)


def test_split_leaves_small_jobs_alone():
    small = job(seeds=(1, 2))
    assert split_request(small, 2) == [small]
    with pytest.raises(ValueError):
        split_request(small, 0)
