"""Memory-aware batching: the fit from two measured calls, the cap it puts on max_batch_images
and on pixels per call, and a replica using it (the real tiny engine, an injected probe)."""

import asyncio

import pytest

from serve_app.memory_fit import batch_limit, fit_memory
from serve_app.model import ImageModel
from tests.conftest import make_job

GIB = 2**30
MP = 1024 * 1024


def test_two_measured_calls_give_the_line_and_the_largest_call():
    fit = fit_memory(
        peak_one=12 * GIB, peak_two=14 * GIB, pixels_per_image=MP, capacity_bytes=80 * GIB
    )
    assert fit.base_bytes == 10 * GIB and fit.bytes_per_pixel == 2 * GIB / MP
    assert fit.max_images(1024, 1024) == 31  # (0.9 x 80 - 10) / 2
    assert fit.max_images(512, 512) == 124 and fit.max_images(2048, 2048) == 7


def test_the_default_is_capped_and_an_explicit_value_that_cannot_fit_is_refused():
    small = fit_memory(12 * GIB, 14 * GIB, MP, capacity_bytes=16 * GIB)  # (14.4 - 10) / 2 = 2
    assert batch_limit(small, None, 8, 1024, 1024) == 2
    assert batch_limit(small, 2, 8, 1024, 1024) == 2
    with pytest.raises(ValueError, match="max_batch_images 4 cannot fit in memory.*at most 2"):
        batch_limit(small, 4, 8, 1024, 1024)
    full = fit_memory(12 * GIB, 14 * GIB, MP, capacity_bytes=12 * GIB)
    with pytest.raises(ValueError, match="not even one image fits"):
        batch_limit(full, None, 8, 1024, 1024)
    assert batch_limit(None, None, 8, 1024, 1024) == 8 and batch_limit(None, 3, 8, 1, 1) == 3


class FakeProbe:
    """Reports a 100 MB base plus 10 MB per 64x64 image for the two warm-up measurements, on a
    device of 150 MB: at most (135 - 100) / 10 = 3 such images per call."""

    def __init__(self):
        self.peaks = iter([110_000_000, 120_000_000])
        self.runs = 0

    def peak_bytes(self, run):
        run()  # the real measurement calls run on the tiny engine
        self.runs += 1
        return next(self.peaks)

    def capacity_bytes(self):
        return 150_000_000


@pytest.fixture(scope="module")
def model(tiny_cache_dir):
    config = {"id": "t", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup_sizes": ["64x64"]}
    return ImageModel(config, memory_probe=FakeProbe())


def test_a_replica_caps_its_calls_to_what_fits(model):
    assert model.memory_fit.max_images(64, 64) == 3
    model.reconfigure({})
    assert model.batches.max_images == 3
    result = asyncio.run(model.generate(make_job(seeds=(1, 2, 3, 4, 5))))
    assert result.batch_sizes == [3, 2] and len(result.images) == 5
    # Four times the pixels: one image per call.
    big = asyncio.run(model.generate(make_job(width=128, height=128, seeds=(1, 2))))
    assert big.batch_sizes == [1, 1]


def test_an_explicit_value_wins_when_it_fits_and_is_refused_when_not(model):
    model.reconfigure({"max_batch_images": 2})
    assert model.batches.max_images == 2
    with pytest.raises(ValueError, match="max_batch_images 5 cannot fit"):
        model.reconfigure({"max_batch_images": 5})
    assert model.batches.max_images == 2  # the refused update changed nothing
