"""GPU speed options that can run on CPU are checked against the plain path on the tiny model."""

import numpy as np
import pytest
import torch

from serve_app.config import ModelConfig
from serve_app.contract import AdapterRef, ModelRequest
from serve_app.engine import ImageEngine, ModelLoadError

STEPS = 8


def load(tiny_cache_dir, **fields) -> ImageEngine:
    engine = ImageEngine(ModelConfig(id="tiny", source="tiny", cache_dir=tiny_cache_dir, **fields))
    engine.load()
    return engine


def generate(engine: ImageEngine, adapters: tuple[AdapterRef, ...] = ()) -> np.ndarray:
    job = ModelRequest(
        request_id="t", prompt="a cat", width=128, height=128, steps=STEPS, guidance=2.5,
        seeds=(1,), adapters=adapters,
    )  # fmt: skip
    [[image]] = engine.generate([job])
    return np.asarray(image).astype(np.int16)


def count_rest_of_transformer_calls(engine: ImageEngine) -> list[int]:
    """Real computations of the last transformer block (a cached step skips every block after
    the first; the block's own hook still runs, so count a layer inside it)."""
    calls = []
    engine.pipe.transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(
        lambda *args: calls.append(1)
    )
    return calls


@pytest.fixture(scope="module")
def plain(tiny_cache_dir) -> np.ndarray:
    torch.set_num_threads(2)
    return generate(load(tiny_cache_dir))


def test_first_block_cache_skips_steps_within_tolerance(tiny_cache_dir, plain):
    engine = load(tiny_cache_dir, speed={"first_block_cache_threshold": 0.5})
    calls = count_rest_of_transformer_calls(engine)
    cached = generate(engine)
    assert 0 < len(calls) < STEPS, f"cache skipped nothing ({len(calls)} of {STEPS} steps ran)"
    diff = np.abs(cached - plain)
    assert diff.max() <= 16 and diff.mean() < 2, (diff.max(), diff.mean())
    calls.clear()
    assert np.array_equal(generate(engine), cached), "cache state leaked between calls"
    assert 0 < len(calls) < STEPS


def test_tight_cache_threshold_reproduces_the_plain_image(tiny_cache_dir, plain):
    engine = load(tiny_cache_dir, speed={"first_block_cache_threshold": 0.01})
    calls = count_rest_of_transformer_calls(engine)
    assert np.array_equal(generate(engine), plain) and len(calls) == STEPS


def test_regional_compile_matches_eager(tiny_cache_dir, plain):
    engine = load(tiny_cache_dir, speed={"compile": True})
    blocks = engine.pipe.transformer.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)
    compiled = generate(engine)
    assert np.abs(compiled - plain).max() <= 2


def test_every_switch_a_cpu_config_allows_at_once_matches_eager(tiny_cache_dir, tmp_path):
    """compile + first-block cache + an attention backend + the VAE memory switches + LoRA
    adapters switched between calls: each pair crashed or not is only known combined (compile
    with the cache did crash). Compared with an eager engine with the same cache and adapters."""
    from serve_app.lora_synthetic import write_adapter

    cache = {"first_block_cache_threshold": 0.3}
    fast = load(
        tiny_cache_dir,
        speed={**cache, "compile": True, "attention_backend": "_native_math"},
        vae_tiling=True,
        vae_slicing=True,
    )
    eager = load(tiny_cache_dir, speed=cache)
    path = tmp_path / "a.safetensors"
    write_adapter(eager.pipe.transformer, path, seed=1)
    for engine in (fast, eager):
        engine.add_adapter("a", engine.read_adapter("a", str(path)))
    images = []
    for adapters in [(), (AdapterRef("a", 1.0),), ()]:  # each switch recompiles the blocks
        image = generate(fast, adapters)
        assert np.abs(image - generate(eager, adapters)).max() <= 2, adapters
        images.append(image)
    assert np.abs(images[1] - images[0]).max() > 2, "the adapter changed nothing"
    assert np.array_equal(images[2], images[0]), "the adapter was not switched off again"


def test_attention_backend_selection(tiny_cache_dir, plain):
    math = generate(load(tiny_cache_dir, speed={"attention_backend": "_native_math"}))
    assert np.abs(math - plain).max() <= 2
    for backend, fragment in [("flash", "flash-attn"), ("bogus", "must be one of")]:
        with pytest.raises(ModelLoadError, match=fragment):
            load(tiny_cache_dir, speed={"attention_backend": backend})


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"speed": {"quantization": "fp8"}}, "needs a CUDA GPU"),
        ({"cpu_offload": True}, "needs a CUDA GPU"),
        ({"device": "cuda"}, "no CUDA GPU is visible"),
    ],
)
def test_cuda_only_options_fail_clearly_on_cpu(tiny_cache_dir, fields, fragment):
    with pytest.raises(ModelLoadError, match=fragment):
        load(tiny_cache_dir, **fields)


def test_memory_options_keep_the_image(tiny_cache_dir, plain):
    engine = load(tiny_cache_dir, vae_tiling=True, vae_slicing=True)
    assert engine.pipe.vae.use_tiling and engine.pipe.vae.use_slicing
    assert np.abs(generate(engine) - plain).max() <= 2


def test_warmup_runs_text_to_image_and_edit(tiny_cache_dir):
    engine = load(tiny_cache_dir, warmup_sizes=["64x64", "128x64"])
    calls = count_rest_of_transformer_calls(engine)
    engine.warmup()
    assert len(calls) == 2 * 2 * 2  # two sizes x (text-to-image, edit) x two steps
