"""The engine on the real tiny pipeline (loaded with from_pretrained), without Ray."""

import numpy as np
import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.contract import ModelRequest
from serve_app.engine import ImageEngine, ModelLoadError
from tests.conftest import assert_batch_equivalent


@pytest.fixture(scope="module")
def engine(tiny_cache_dir):
    torch.set_num_threads(2)
    engine = ImageEngine(ModelConfig(id="tiny", source="tiny", cache_dir=tiny_cache_dir))
    engine.load()
    return engine


def job(seeds=(1,), width=64, height=64, steps=2, prompt="a red cat"):
    return ModelRequest(
        request_id="t",
        prompt=prompt,
        width=width,
        height=height,
        steps=steps,
        guidance=2.5,
        seeds=tuple(seeds),
    )


def as_array(image):
    return np.asarray(image).astype(np.int16)


def test_tiny_model_has_real_flux_geometry(engine):
    pipe = engine.pipe
    assert type(pipe).__name__ == "FluxKontextPipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 16
    assert pipe.transformer.config.in_channels == 64
    assert pipe.transformer.config.guidance_embeds
    assert engine.device == "cpu" and engine.dtype == torch.float32


def test_tiny_build_is_deterministic(tiny_cache_dir, tmp_path):
    from safetensors.torch import load_file

    from serve_app.tiny import ensure_tiny_model

    other = ensure_tiny_model(tmp_path / "again")
    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(f"{tiny_cache_dir}/{name}"), load_file(other / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("size", [(64, 64), (192, 96), (96, 160)])
def test_images_have_exactly_the_requested_size(engine, size):
    [[image]] = engine.generate([job(width=size[0], height=size[1])])
    assert image.size == size


def test_same_seed_is_bit_identical_and_seeds_differ(engine):
    [[a]] = engine.generate([job(seeds=(3,))])
    [[b]] = engine.generate([job(seeds=(3,))])
    [[c]] = engine.generate([job(seeds=(4,))])
    assert np.array_equal(as_array(a), as_array(b))
    assert not np.array_equal(as_array(a), as_array(c))


def test_batched_call_matches_single_calls(engine):
    jobs = [job(seeds=(10, 11)), job(seeds=(12,), prompt="a blue dog")]
    batched = engine.generate(jobs)
    assert [len(images) for images in batched] == [2, 1]
    [[alone_11]] = engine.generate([job(seeds=(11,))])
    [[alone_12]] = engine.generate([job(seeds=(12,), prompt="a blue dog")])
    assert_batch_equivalent(as_array(batched[0][1]), as_array(alone_11))
    assert_batch_equivalent(as_array(batched[1][0]), as_array(alone_12))


def test_incompatible_jobs_are_refused(engine):
    with pytest.raises(ValueError, match="group key"):
        engine.generate([job(), job(width=128)])


def test_step_callback_sees_every_step(engine):
    seen = []
    engine.generate([job(steps=3)], lambda step, total, jobs, latents: seen.append((step, total)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_token_count_uses_t5_tokenizer(engine):
    short = engine.count_text_tokens("a cat")
    assert short == len(engine.pipe.tokenizer_2("a cat").input_ids) and short >= 2
    assert engine.count_text_tokens("cat " * 600) > 512


def test_missing_weights_fail_with_advice(tmp_path):
    engine = ImageEngine(ModelConfig(id="x", source=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="HF_TOKEN"):
        engine.load()
