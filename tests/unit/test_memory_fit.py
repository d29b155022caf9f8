"""Memory-aware batching: the fit from two measured calls, the cap it puts on max_batch_images
and on pixels per call, and a replica using it (the real tiny engine, an injected probe)."""

import asyncio
import re
from pathlib import Path

import pytest

from serve_app.memory_fit import batch_limit, fit_memory
from serve_app.model import ImageModel
from tests.conftest import make_job

ROOT = Path(__file__).resolve().parents[2]
HUB_ARCHITECTURE = {
    "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "in_channels": 64,
}  # fmt: skip
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


def tiny_plan(model: ImageModel, base: int, per_image: int, **architecture) -> dict:
    """A plan (`bench plan`'s shape) for the tiny model's architecture: `base` + `per_image`
    bytes per 64x64 edit image, batches 1..4."""
    from serve_app.memory_plan import ARCHITECTURE_FIELDS

    config = model.engine.pipe.transformer.config
    planned = {field: config[field] for field in ARCHITECTURE_FIELDS} | architecture
    rows = [
        {"task": "edits-1", "size": "64x64", "batch": n, "weights": "bf16", "lora_rank": 0,
         "peak_bytes": base + n * per_image}
        for n in range(1, 5)
    ]  # fmt: skip
    return {"architecture": planned, "headroom": 0.9, "rows": rows}


@pytest.fixture
def planned(tmp_path, monkeypatch, tiny_cache_dir):
    """Replicas (bf16, as on a GPU) started with a committed plan of 100 MB + 5 MB per image
    on the probe's 150 MB device."""
    import json

    from serve_app import memory_plan

    config = {"id": "t", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup": False}
    reference = ImageModel(config)
    path = tmp_path / "plan.json"

    def start(warmup: bool, probe=None, architecture=None, **fields) -> ImageModel:
        plan = tiny_plan(reference, 100_000_000, 5_000_000, **(architecture or {}))
        path.write_text(json.dumps(plan))
        monkeypatch.setattr(memory_plan, "COMMITTED_PLAN", path)
        config = {"id": "t", "source": "tiny", "cache_dir": tiny_cache_dir, "dtype": "bfloat16",
                  "warmup_sizes": ["64x64"], "warmup": warmup, **fields}  # fmt: skip
        return ImageModel(config, memory_probe=probe or FakeProbe())

    return start


def test_without_a_warm_up_measurement_the_plan_caps_calls(planned):
    probe = FakeProbe()
    model = planned(warmup=False, probe=probe)
    # (135 - 100) / (5 x 1.2): the plan's line with convolution scratch added per image
    assert probe.runs == 0 and model.memory_fit.max_images(64, 64) == 5
    model.reconfigure({})
    assert model.batches.max_images == 5


def test_the_warm_up_measurement_wins_over_the_plan(planned):
    probe = FakeProbe()
    model = planned(warmup=True, probe=probe)
    assert probe.runs == 2 and model.memory_fit.max_images(64, 64) == 3  # measured, not 5


@pytest.mark.parametrize(
    "architecture, fields",
    [
        ({"num_layers": 19}, {}),  # another model
        ({}, {"vae_slicing": True}),  # what the plan does not model: measured instead
        ({}, {"dtype": "float32"}),
    ],
)
def test_a_plan_that_does_not_describe_the_replica_is_not_used(planned, architecture, fields):
    probe = FakeProbe()
    model = planned(warmup=False, probe=probe, architecture=architecture, **fields)
    assert probe.runs == 2 and model.memory_fit.max_images(64, 64) == 3


class OutOfMemoryProbe(FakeProbe):
    def peak_bytes(self, run):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_measurement_that_runs_out_of_memory_leaves_one_image_per_call(planned):
    model = planned(warmup=True, probe=OutOfMemoryProbe())
    assert model.memory_fit.max_images(64, 64) == 1  # not the plan's 5: the GPU said no
    model.reconfigure({})
    assert model.batches.max_images == 1


def test_the_committed_plan_applies_to_flux_kontext_dev_and_caps_its_batches():
    """The plan in serve_app/data is of FLUX.1-Kontext-dev's architecture (synthetic.py builds
    it; the hub checkpoint's config has the same fields) and gives the cap
    configs/flux-kontext.yaml documents."""
    import torch
    from diffusers import FluxTransformer2DModel

    from serve_app import memory_plan
    from serve_app.synthetic import TRANSFORMER

    plan = memory_plan.load_plan(memory_plan.COMMITTED_PLAN)
    # black-forest-labs/FLUX.1-Kontext-dev transformer/config.json, as published
    assert plan["architecture"] == HUB_ARCHITECTURE
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(TRANSFORMER).config
    assert all(transformer[key] == value for key, value in plan["architecture"].items())
    caps = {}
    for gpu, capacity in memory_plan.GPUS.items():
        for weights in ("bf16", "fp8"):
            # configs/flux-kontext.yaml turns LoRA on: the planned adapter is rank 32
            rank = memory_plan.LORA_RANK
            fit = memory_plan.planned_fit(plan, "edits-1", 1024, 1024, weights, rank, capacity)
            caps[gpu, weights] = fit.max_images(1024, 1024)
    comment = (ROOT / "configs" / "flux-kontext.yaml").read_text()
    documented = re.search(
        r"planned cap: H100-80GB bf16 (\d+), fp8 (\d+); H200-141GB bf16 (\d+), fp8 (\d+)", comment
    )
    assert documented, "configs/flux-kontext.yaml no longer documents the planned cap"
    keys = [
        ("H100-80GB", "bf16"),
        ("H100-80GB", "fp8"),
        ("H200-141GB", "bf16"),
        ("H200-141GB", "fp8"),
    ]
    assert caps == dict(zip(keys, map(int, documented.groups()), strict=True))
