"""Model families without Ray: config defaults, what the ingress refuses per family, and the
FLUX.1 [dev] family's pipelines (text-to-image, image-to-image edits and variations, inpainting)
on its embedded tiny model, each input changing the output."""

import asyncio
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.contract import APIError
from serve_app.engine import ImageEngine
from serve_app.families import FAMILIES, traits
from serve_app.families.base import _steps_run, image_to_image_steps
from serve_app.protocol import ImageEditRequest, ImageGenerationRequest
from serve_app.resolution import resolve_generation
from tests.conftest import assert_batch_equivalent, make_job


def tiny_engine(tmp_path_factory, family: str, model_id: str) -> ImageEngine:
    """A loaded engine on the family's tiny model, saved in a fresh cache directory."""
    torch.set_num_threads(2)
    config = ModelConfig(
        id=model_id, family=family, source="tiny", cache_dir=str(tmp_path_factory.mktemp(family))
    )
    engine = ImageEngine(config)
    engine.load()
    return engine


def full_vae_preview(engine, latents, width: int, height: int) -> Image.Image:
    """A preview decoded by the full VAE (not the fitted latent -> RGB map)."""
    projection, engine._preview_projection = engine._preview_projection, None
    try:
        [preview] = engine.decode_preview(latents, width, height)
    finally:
        engine._preview_projection = projection
    return preview


def save_peft_lora(transformer, pipeline_class, folder, targets=("to_q", "to_k", "to_v")) -> str:
    """A LoRA built with peft on `transformer` (random nonzero B, so it changes the output),
    saved with the pipeline's `save_lora_weights`; returns the file's path."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    pipeline_class.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.7, 0.8, 0.85, 0.99, 1.0])
def test_image_to_image_schedules_run_exactly_the_requested_steps(strength):
    for steps in range(1, 60):
        length = image_to_image_steps(steps, strength)
        assert _steps_run(length, strength) == steps, (steps, strength, length)
        assert _steps_run(length + 1, strength) > steps  # the longest: strength is honoured
        if strength < 1:
            assert length > steps or steps * (1 - strength) < 1  # the first step is skipped


def test_family_defaults_apply_and_explicit_fields_win():
    flux = ModelConfig(id="f", family="flux")
    assert flux.default_guidance == 3.5 and flux.quality_steps.high == 28
    assert ModelConfig(id="k").default_guidance == 2.5  # FLUX.1 Kontext
    tiny = ModelConfig(id="f", family="flux", source="tiny", default_guidance=1.5)
    assert tiny.default_guidance == 1.5 and tiny.quality_steps.high == 8 and tiny.min_side == 64
    with pytest.raises(ValueError, match="family"):
        ModelConfig(id="x", family="sdxl")


def test_every_family_names_an_importable_runner():
    for name, family in FAMILIES.items():
        assert family.name == name and set(family.endpoints) <= {
            "generations",
            "edits",
            "variations",
        }
        module, _, cls = family.runner.partition(":")
        assert hasattr(__import__(module, fromlist=[cls]), cls)


def _models() -> dict[str, ModelConfig]:
    kontext = ModelConfig(id="kontext", source="tiny")
    flux = ModelConfig(id="flux", family="flux", source="tiny")
    return {"kontext": kontext, "flux": flux}


def test_an_edit_with_several_images_is_refused_by_a_one_image_family():
    edit = ImageEditRequest(prompt="x", model="flux")
    with pytest.raises(APIError) as refused:
        resolve_generation(edit, _models(), 4, input_size=(64, 64), input_images=2)
    assert refused.value.status == 400 and refused.value.param == "image"
    assert "FLUX.1 [dev]" in str(refused.value)
    kontext = ImageEditRequest(prompt="x", model="kontext")
    resolved = resolve_generation(kontext, _models(), 4, input_size=(64, 64), input_images=2)
    assert resolved.model_id == "kontext"


def test_an_endpoint_a_family_does_not_serve_is_a_400_naming_model(monkeypatch):
    """A family without edits (the Qwen-Image text-to-image checkpoint is one): its model is
    refused on /v1/images/edits, and a request without `model` goes to one that serves it."""
    from dataclasses import replace

    import serve_app.families as families

    generate_only = replace(FAMILIES["flux"], endpoints=("generations",))
    monkeypatch.setitem(families.FAMILIES, "flux", generate_only)
    models = {"flux": _models()["flux"], "kontext": _models()["kontext"]}
    with pytest.raises(APIError) as refused:
        resolve_generation(
            ImageEditRequest(prompt="x", model="flux"), models, 4, input_size=(64, 64)
        )
    assert refused.value.status == 400 and refused.value.param == "model"
    assert "/v1/images/edits" in str(refused.value) and "/v1/images/generations" in str(
        refused.value
    )
    unnamed = resolve_generation(ImageEditRequest(prompt="x"), models, 4, input_size=(64, 64))
    assert unnamed.model_id == "kontext"
    assert resolve_generation(ImageGenerationRequest(prompt="x"), models, 4).model_id == "flux"


# --- FLUX.1 [dev] on its tiny model


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return tiny_engine(tmp_path_factory, "flux", "flux-tiny")


def halves(left: str, right: str, size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def run(engine, **fields) -> np.ndarray:
    [[image]] = engine.generate([make_job(**{"guidance": 3.5, "steps": 4, **fields})])
    return np.asarray(image).astype(np.int16)


def test_flux_loads_flux_pipeline_with_its_variants_over_the_same_modules(flux):
    assert type(flux.pipe).__name__ == "FluxPipeline"
    runner = flux.family
    assert type(runner.img2img_pipe).__name__ == "FluxImg2ImgPipeline"
    assert type(runner.inpaint_pipe).__name__ == "FluxInpaintPipeline"
    assert runner.img2img_pipe.transformer is flux.pipe.transformer
    assert runner.inpaint_pipe.vae is flux.pipe.vae


def test_flux_text_to_image_each_input_changes_the_output(flux):
    base = run(flux)
    assert np.array_equal(base, run(flux))  # the same request: the same pixels
    for change in ({"prompt": "a blue dog"}, {"seeds": (2,)}, {"guidance": 7.0}, {"steps": 3}):
        assert (run(flux, **change) != base).mean() > 0.2, change


def test_flux_edits_re_noise_the_input_and_each_input_changes_the_output(flux):
    red_blue, white = halves("red", "blue"), Image.new("RGB", (64, 64), "white")
    edit = run(flux, conditioning=(red_blue,))
    assert np.array_equal(edit, run(flux, conditioning=(red_blue,)))
    assert (edit != run(flux)).mean() > 0.2  # not text-to-image
    assert (edit != run(flux, conditioning=(white,))).mean() > 0.2  # the image matters
    assert (edit != run(flux, conditioning=(red_blue,), prompt="a blue dog")).mean() > 0.2
    assert (edit != run(flux, conditioning=(red_blue,), seeds=(2,))).mean() > 0.2


def test_flux_image_strength_changes_how_much_of_the_input_is_kept(tmp_path):
    config = ModelConfig(
        id="f", family="flux", source="tiny", cache_dir=str(tmp_path), image_strength=0.3
    )
    engine = ImageEngine(config)
    engine.load()
    red_blue = halves("red", "blue")
    gentle = run(engine, conditioning=(red_blue,))
    engine.family.strength = 0.95
    # Random weights: the VAE's round trip does not resemble the input, so this checks that
    # the strength reaches the call, not that the image looks more like the input.
    assert (run(engine, conditioning=(red_blue,)) != gentle).mean() > 0.2


def test_flux_image_to_image_runs_the_requested_steps_with_previews(flux):
    steps, previews = [], []
    request = make_job(
        steps=5, guidance=3.5, conditioning=(halves("red", "blue"),), preview_steps=(1, 3),
        events=previews.append,
    )  # fmt: skip
    flux.generate([request], lambda step, total, *_: steps.append((step, total)))
    assert steps == [(step, 5) for step in range(5)]
    assert [p.step for p in previews] == [1, 3]
    assert all(p.images[0].size == (64, 64) for p in previews)


def test_flux_masked_edit_keeps_unmasked_pixels_and_changes_masked_ones(flux):
    image = halves("red", "blue")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half is editable
    fields = dict(conditioning=(image,), init_image=image, mask=mask)
    out = run(flux, **fields)
    original = np.asarray(image).astype(np.int16)
    assert np.array_equal(out[:, 32:], original[:, 32:])
    assert (out[:, :32] != original[:, :32]).mean() > 0.5
    assert (out != run(flux, **fields, prompt="a blue dog")).mean() > 0.1


def test_flux_batched_matches_alone(flux):
    image = halves("red", "blue")
    jobs = [
        make_job(request_id="a", steps=3, guidance=3.5, conditioning=(image,), seeds=(1, 2)),
        make_job(request_id="b", steps=3, guidance=3.5, conditioning=(image,), prompt="a dog"),
    ]
    batched = flux.generate(jobs)
    for job, images in zip(jobs, batched, strict=True):
        alone = flux.generate([job])[0]
        for one, other in zip(images, alone, strict=True):
            assert_batch_equivalent(np.asarray(one, np.int16), np.asarray(other, np.int16))


def test_flux_counts_tokens_with_t5(flux):
    assert flux.count_text_tokens("a cat") == len(flux.pipe.tokenizer_2("a cat").input_ids)
    assert traits("flux").max_text_tokens == 512


def test_a_peft_lora_for_flux_loads_and_changes_the_output(flux, tmp_path):
    from diffusers import FluxPipeline

    from serve_app.families.flux import FluxRunner

    path = save_peft_lora(FluxRunner(flux.config).build_tiny().transformer, FluxPipeline, tmp_path)
    base = run(flux)
    state = flux.read_adapter("mine", path)
    flux.add_adapter("mine", state)
    try:
        from serve_app.contract import AdapterRef

        adapted = run(flux, adapters=(AdapterRef("mine", 1.0),))
        assert (adapted != base).mean() > 0.2
        assert np.array_equal(run(flux), base)  # without it: the base weights exactly
    finally:
        flux.remove_adapters(["mine"])


# --- FLUX.2 [klein] on its tiny model


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    return tiny_engine(tmp_path_factory, "flux2-klein", "klein-tiny")


def test_klein_loads_its_pipelines_over_the_same_modules(klein):
    assert type(klein.pipe).__name__ == "Flux2KleinPipeline"
    assert type(klein.family.inpaint_pipe).__name__ == "Flux2KleinInpaintPipeline"
    assert klein.family.inpaint_pipe.transformer is klein.pipe.transformer
    assert klein.pipe.transformer.config.in_channels == 128  # 32 latent channels, 2x2 packed
    assert klein.pipe.vae.config.latent_channels == 32


def test_klein_each_input_changes_the_output(klein):
    base = run(klein, guidance=1.0)
    assert np.array_equal(base, run(klein, guidance=1.0))
    for change in ({"prompt": "a blue dog"}, {"seeds": (2,)}, {"steps": 3}):
        assert (run(klein, guidance=1.0, **change) != base).mean() > 0.1, change
    red_blue = halves("red", "blue")
    edit = run(klein, guidance=1.0, conditioning=(red_blue,))
    assert (edit != base).mean() > 0  # the reference reaches the transformer
    white = run(klein, guidance=1.0, conditioning=(Image.new("RGB", (64, 64), "white"),))
    assert (edit != white).mean() > 0  # random weights: a small but certain difference
    assert np.array_equal(edit, run(klein, guidance=1.0, conditioning=(red_blue,)))


def test_klein_masked_edit_keeps_unmasked_pixels(klein):
    image = halves("red", "blue")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    out = run(klein, guidance=1.0, conditioning=(image,), init_image=image, mask=mask)
    original = np.asarray(image).astype(np.int16)
    assert np.array_equal(out[:, 32:], original[:, 32:])
    assert (out[:, :32] != original[:, :32]).mean() > 0.5


def test_klein_preview_of_the_last_step_is_the_final_image(klein):
    """The family's unpacking and batch-norm de-normalisation are the pipeline's own: the full
    VAE preview of the last step's latents equals the returned image."""
    last = []
    request = make_job(steps=3, guidance=1.0, width=96, height=64)
    [[image]] = klein.generate([request], lambda step, total, _, latents: last.append(latents))
    preview = full_vae_preview(klein, last[-1], 96, 64)
    assert_batch_equivalent(np.asarray(preview, np.int16), np.asarray(image, np.int16))
    [rgb] = klein.decode_preview(last[-1], 96, 64)  # the fitted latent -> RGB map
    assert rgb.size == (96, 64)


def test_klein_counts_tokens_in_its_chat_template(klein):
    tokenizer = klein.pipe.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert klein.count_text_tokens("a cat") == len(tokenizer(text).input_ids) > 10


def test_klein_batches_requests_with_the_same_references(klein):
    image = halves("red", "blue")
    jobs = [
        make_job(request_id="a", steps=3, guidance=1.0, conditioning=(image,), seeds=(1, 2)),
        make_job(request_id="b", steps=3, guidance=1.0, conditioning=(image,), prompt="a dog"),
    ]
    for job, images in zip(jobs, klein.generate(jobs), strict=True):
        for one, other in zip(images, klein.generate([job])[0], strict=True):
            assert_batch_equivalent(np.asarray(one, np.int16), np.asarray(other, np.int16))


def test_klein_edits_with_other_references_never_share_a_call():
    from serve_app.batching import group_key
    from serve_app.imageops import Conditioning

    models = {"klein": ModelConfig(id="klein", family="flux2-klein", source="tiny")}
    edit = ImageEditRequest(prompt="x", model="klein", size="64x64")
    resolved = resolve_generation(edit, models, 4, input_size=(64, 64))
    red, blue = (Conditioning(Image.new("RGB", (64, 64), c)) for c in ("red", "blue"))
    a, b = resolved.to_model_request("a", red), resolved.to_model_request("b", blue)
    again = resolved.to_model_request("c", Conditioning(Image.new("RGB", (64, 64), "red")))
    assert group_key(a) != group_key(b) and group_key(a) == group_key(again)
    kontext = resolve_generation(
        ImageEditRequest(prompt="x", size="64x64"), _models(), 4, input_size=(64, 64)
    )
    assert group_key(kontext.to_model_request("a", red)) == group_key(
        kontext.to_model_request("b", blue)
    )  # Kontext takes a reference per image


def test_klein_refuses_guidance_naming_it():
    models = {"klein": ModelConfig(id="klein", family="flux2-klein", source="tiny")}
    with pytest.raises(APIError) as refused:
        resolve_generation(ImageGenerationRequest(prompt="x", guidance=3.0), models, 4)
    assert refused.value.param == "guidance" and "step-distilled" in str(refused.value)
    assert resolve_generation(ImageGenerationRequest(prompt="x"), models, 4).guidance == 1.0


def test_a_peft_lora_for_klein_loads_and_changes_the_output(klein, tmp_path):
    from diffusers import Flux2KleinPipeline

    from serve_app.contract import AdapterRef
    from serve_app.families.flux2_klein_build import build_tiny_pipeline

    targets = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    transformer = build_tiny_pipeline().transformer
    path = save_peft_lora(transformer, Flux2KleinPipeline, tmp_path, targets)
    base = run(klein, guidance=1.0)
    state = klein.read_adapter("mine", path)
    klein.add_adapter("mine", state)
    try:
        adapted = run(klein, guidance=1.0, adapters=(AdapterRef("mine", 1.0),))
        assert (adapted != base).mean() > 0.1
        assert np.array_equal(run(klein, guidance=1.0), base)
    finally:
        klein.remove_adapters(["mine"])


def test_a_flux1_lora_is_refused_by_klein_naming_the_family(klein, flux, tmp_path):
    from serve_app.engine_adapters import AdapterFamilyError
    from serve_app.lora_synthetic import write_adapter

    path = tmp_path / "flux1.safetensors"
    write_adapter(flux.pipe.transformer, path)
    with pytest.raises(AdapterFamilyError, match="FLUX.2"):
        klein.read_adapter("flux1", str(path))


@pytest.mark.parametrize(
    ("family", "speed", "memory"),
    [
        (
            "flux",
            {
                "first_block_cache_threshold": 0.3,
                "compile": True,
                "attention_backend": "_native_math",
            },
            {"vae_tiling": True, "vae_slicing": True},
        ),
        ("flux2-klein", {"compile": True, "attention_backend": "_native_math"}, {}),
        ("qwen-image", {"compile": True, "attention_backend": "_native_math"}, {}),
    ],
)
def test_every_switch_a_family_allows_at_once_matches_eager(family, speed, memory, tmp_path):
    """Each family with every speed switch it allows on a CPU, and a LoRA adapter switched on
    and off between calls (each switch recompiles the blocks), against an eager engine with
    the same cache: switches crash or not only in combination."""
    cache = {k: v for k, v in speed.items() if k == "first_block_cache_threshold"}

    def engine(**fields):
        config = ModelConfig(
            id="x", family=family, source="tiny", cache_dir=str(tmp_path), **fields
        )
        loaded = ImageEngine(config)
        loaded.load()
        return loaded

    fast, eager = engine(speed=speed, **memory), engine(speed=cache)
    from serve_app.contract import AdapterRef

    donor = fast.family.build_tiny().transformer
    path = save_peft_lora(donor, fast.family.pipeline_class(), tmp_path / "lora")
    for loaded in (fast, eager):
        loaded.add_adapter("a", loaded.read_adapter("a", path))
    images = []
    for adapters in [(), (AdapterRef("a", 1.0),), ()]:
        image = run(fast, guidance=1.0, steps=6, adapters=adapters)
        assert np.abs(image - run(eager, guidance=1.0, steps=6, adapters=adapters)).max() <= 2
        images.append(image)
    assert (images[1] != images[0]).mean() > 0.01, "the adapter changed nothing"
    assert np.array_equal(images[2], images[0]), "the adapter was not switched off again"


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"family": "flux2-klein", "speed": {"first_block_cache_threshold": 0.1}}, "first_block"),
        ({"family": "flux2-klein", "speed": {"quantization": "fp8"}}, "quantization"),
        ({"family": "qwen-image", "parallel": {"ulysses": 2}}, "parallel"),
        ({"family": "qwen-image", "speed": {"first_block_cache_threshold": 0.1}}, "first_block"),
        ({"family": "qwen-image-edit", "speed": {"quantization": "fp8"}}, "quantization"),
    ],
)
def test_switches_a_family_does_not_run_are_refused_at_config(fields, refused):
    with pytest.raises(ValueError, match=refused):
        ModelConfig(id="x", **fields)


# --- Qwen-Image on its tiny model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return tiny_engine(tmp_path_factory, "qwen-image", "qwen-tiny")


def test_qwen_loads_its_pipelines_over_the_same_modules(qwen):
    assert type(qwen.pipe).__name__ == "QwenImagePipeline"
    assert type(qwen.family.img2img_pipe).__name__ == "QwenImageImg2ImgPipeline"
    assert type(qwen.family.inpaint_pipe).__name__ == "QwenImageInpaintPipeline"
    assert qwen.family.inpaint_pipe.transformer is qwen.pipe.transformer
    assert qwen.config.default_guidance == 4.0  # true CFG, as the model card


def test_qwen_each_input_changes_the_output_true_cfg_included(qwen):
    base = run(qwen, guidance=4.0)
    assert np.array_equal(base, run(qwen, guidance=4.0))
    changes = ({"prompt": "a blue dog"}, {"seeds": (2,)}, {"steps": 3}, {"guidance": 7.0})
    for change in changes:
        assert (run(qwen, **{"guidance": 4.0, **change}) != base).mean() > 0.1, change
    no_cfg = run(qwen, guidance=1.0)  # one pass per step, no negative prompt
    assert (no_cfg != base).mean() > 0.1


def test_qwen_negative_prompt_reaches_true_cfg(tmp_path):
    def image(negative: str) -> np.ndarray:
        config = ModelConfig(
            id="q", family="qwen-image", source="tiny", cache_dir=str(tmp_path),
            negative_prompt=negative,
        )  # fmt: skip
        engine = ImageEngine(config)
        engine.load()
        return run(engine, guidance=4.0)

    assert (image(" ") != image("blurry, low quality")).mean() > 0.1


def test_qwen_edits_re_noise_the_input(qwen):
    red_blue = halves("red", "blue")
    edit = run(qwen, guidance=4.0, conditioning=(red_blue,))
    assert (edit != run(qwen, guidance=4.0)).mean() > 0.2
    white = run(qwen, guidance=4.0, conditioning=(Image.new("RGB", (64, 64), "white"),))
    assert (edit != white).mean() > 0.1
    steps = []
    qwen.generate(
        [make_job(steps=5, guidance=4.0, conditioning=(red_blue,))],
        lambda step, total, *_: steps.append((step, total)),
    )
    assert steps == [(step, 5) for step in range(5)]


def test_qwen_masked_edit_keeps_unmasked_pixels(qwen):
    image = halves("red", "blue")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    out = run(qwen, guidance=4.0, conditioning=(image,), init_image=image, mask=mask)
    original = np.asarray(image).astype(np.int16)
    assert np.array_equal(out[:, 32:], original[:, 32:])
    assert (out[:, :32] != original[:, :32]).mean() > 0.5


def test_qwen_preview_of_the_last_step_is_the_final_image(qwen):
    last = []
    request = make_job(steps=3, guidance=4.0, width=96, height=64)
    [[image]] = qwen.generate([request], lambda step, total, _, latents: last.append(latents))
    preview = full_vae_preview(qwen, last[-1], 96, 64)
    assert_batch_equivalent(np.asarray(preview, np.int16), np.asarray(image, np.int16))
    [rgb] = qwen.decode_preview(last[-1], 96, 64)
    assert rgb.size == (96, 64)


def test_qwen_counts_the_tokens_its_encoder_keeps(qwen):
    pipe = qwen.pipe
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a cat")).input_ids
    assert qwen.count_text_tokens("a cat") == len(ids) - pipe.prompt_template_encode_start_idx
    longer = qwen.count_text_tokens("a cat on a red hat in the sun")
    assert longer > qwen.count_text_tokens("a cat")


def test_qwen_batched_matches_alone(qwen):
    jobs = [
        make_job(request_id="a", steps=3, guidance=4.0, seeds=(1, 2)),
        make_job(request_id="b", steps=3, guidance=4.0, prompt="a dog on a long street"),
    ]
    for job, images in zip(jobs, qwen.generate(jobs), strict=True):
        for one, other in zip(images, qwen.generate([job])[0], strict=True):
            assert_batch_equivalent(np.asarray(one, np.int16), np.asarray(other, np.int16))


def test_a_peft_lora_for_qwen_loads_and_a_flux_one_is_refused(qwen, flux, tmp_path):
    from diffusers import QwenImagePipeline

    from serve_app.contract import AdapterRef
    from serve_app.engine_adapters import AdapterFamilyError
    from serve_app.lora_synthetic import write_adapter

    path = save_peft_lora(qwen.family.build_tiny().transformer, QwenImagePipeline, tmp_path)
    base = run(qwen, guidance=4.0)
    state = qwen.read_adapter("mine", path)
    qwen.add_adapter("mine", state)
    try:
        adapted = run(qwen, guidance=4.0, adapters=(AdapterRef("mine", 1.0),))
        assert (adapted != base).mean() > 0.05
        assert np.array_equal(run(qwen, guidance=4.0), base)
    finally:
        qwen.remove_adapters(["mine"])
    write_adapter(flux.pipe.transformer, tmp_path / "flux1.safetensors")
    with pytest.raises(AdapterFamilyError, match="Qwen-Image"):
        qwen.read_adapter("flux1", str(tmp_path / "flux1.safetensors"))


# --- Qwen-Image-Edit on its tiny model


@pytest.fixture(scope="module")
def qwen_edit(tmp_path_factory):
    return tiny_engine(tmp_path_factory, "qwen-image-edit", "qwen-edit-tiny")


def edit(engine, image, **fields) -> np.ndarray:
    return run(engine, **{"guidance": 4.0, "conditioning": (image,), **fields})


def test_qwen_edit_loads_the_edit_pipeline_with_its_processor(qwen_edit):
    pipe = qwen_edit.pipe
    assert type(pipe).__name__ == "QwenImageEditPipeline"
    assert type(pipe.processor).__name__ == "Qwen2VLProcessor"
    assert pipe.prompt_template_encode_start_idx == 64  # the edit template's dropped prefix
    assert qwen_edit.config.default_guidance == 4.0 and qwen_edit.config.quality_steps.high == 8


def test_qwen_edit_preferred_sizes_are_not_resized_again_by_the_pipeline():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    production = ModelConfig(id="q", family="qwen-image-edit")
    for width, height in production.resolution_buckets:
        assert calculate_dimensions(1024 * 1024, width / height)[:2] == (width, height)


def test_qwen_edit_each_input_changes_the_output(qwen_edit):
    red_blue = halves("red", "blue")
    base = edit(qwen_edit, red_blue, steps=2)
    assert np.array_equal(base, edit(qwen_edit, red_blue, steps=2))  # the same pixels
    # At 64x64 the output is 16 tokens beside the input's ~4,100 latent tokens (~1 MP) and its
    # ~1,300 vision tokens, so with random weights the prompt and the guidance move few pixels,
    # by one level; alone twice is bit-identical, so any difference is the input's doing.
    changes = (
        ({"prompt": "a photo of a red house in the city at night"}, 0.01),
        ({"seeds": (2,)}, 0.5),
        ({"steps": 3}, 0.3),
        ({"guidance": 7.0}, 0.003),
        ({"guidance": 1.0}, 0.003),  # true CFG off: one pass a step, no negative prompt
        ({"conditioning": (Image.new("RGB", (64, 64), "white"),)}, 0.05),
    )
    for change, least in changes:
        assert (edit(qwen_edit, red_blue, **{"steps": 2, **change}) != base).mean() > least, change


def test_qwen_edit_sees_the_image_through_its_text_encoder_too(qwen_edit):
    """Two images with the same VAE latents' shape but other pixels give other prompt
    embeddings: the vision tower reads the input, not only the VAE."""
    pipe = qwen_edit.pipe
    embeds = [
        pipe.encode_prompt(prompt=["a cat"], image=[image], device="cpu")[0]
        for image in (halves("red", "blue", (512, 512)), halves("white", "black", (512, 512)))
    ]
    assert embeds[0].shape == embeds[1].shape
    assert not torch.allclose(embeds[0], embeds[1])


def test_qwen_edit_batched_matches_alone(qwen_edit):
    jobs = [
        make_job(request_id="a", steps=2, guidance=4.0, conditioning=(halves("red", "blue"),),
                 seeds=(1, 2)),
        make_job(request_id="b", steps=2, guidance=4.0, prompt="a dog",
                 conditioning=(halves("white", "black"),)),
    ]  # fmt: skip
    for job, images in zip(jobs, qwen_edit.generate(jobs), strict=True):
        for one, other in zip(images, qwen_edit.generate([job])[0], strict=True):
            assert_batch_equivalent(np.asarray(one, np.int16), np.asarray(other, np.int16))


def test_qwen_edit_preview_follows_the_prompts_pass_and_ends_at_the_image(qwen_edit):
    """With true CFG a step runs two transformer passes; the preview hook keeps the first
    (the prompt's). The last step's full-VAE preview equals the returned image."""
    last, previews = [], []
    request = make_job(
        steps=3, guidance=4.0, width=96, height=64, conditioning=(halves("red", "blue"),),
        preview_steps=(1,), events=previews.append,
    )  # fmt: skip
    calls = []
    hook = qwen_edit.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        [[image]] = qwen_edit.generate(
            [request], lambda step, total, _, latents: last.append(latents)
        )
    finally:
        hook.remove()
    assert len(calls) == 6 and [p.step for p in previews] == [1]  # 2 passes x 3 steps
    calls.clear()
    hook = qwen_edit.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        qwen_edit.generate([replace(request, guidance=1.0, events=None, preview_steps=())])
    finally:
        hook.remove()
    assert len(calls) == 3  # guidance 1: true CFG off, one pass a step
    preview = full_vae_preview(qwen_edit, last[-1], 96, 64)
    assert_batch_equivalent(np.asarray(preview, np.int16), np.asarray(image, np.int16))


def test_qwen_edit_counts_prompt_tokens_in_its_edit_template(qwen_edit):
    pipe = qwen_edit.pipe
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a cat")).input_ids
    count = qwen_edit.count_text_tokens("a cat")
    assert count == len(ids) - 64 and qwen_edit.count_text_tokens("a cat on a red hat") > count


def test_qwen_edit_refuses_generations_and_masks_naming_the_parameter():
    models = {"edit": ModelConfig(id="edit", family="qwen-image-edit", source="tiny")}
    with pytest.raises(APIError) as refused:
        resolve_generation(ImageGenerationRequest(prompt="x", model="edit"), models, 4)
    assert refused.value.param == "model" and "Qwen-Image-Edit" in str(refused.value)
    with pytest.raises(APIError) as refused:
        resolve_generation(
            ImageEditRequest(prompt="x", model="edit"), models, 4, input_size=(64, 64),
            masked=True,
        )  # fmt: skip
    assert refused.value.param == "mask"
    two = resolve_generation(
        ImageEditRequest(prompt="x", model="edit"), models, 4, input_size=(64, 64), input_images=2
    )
    assert two.model_id == "edit"  # several images: one stitched canvas, as for Kontext


def test_a_peft_lora_for_qwen_edit_loads_and_a_flux_one_is_refused(qwen_edit, flux, tmp_path):
    from diffusers import QwenImageEditPipeline

    from serve_app.contract import AdapterRef
    from serve_app.engine_adapters import AdapterFamilyError
    from serve_app.lora_synthetic import write_adapter

    path = save_peft_lora(
        qwen_edit.family.build_tiny().transformer, QwenImageEditPipeline, tmp_path
    )
    red_blue = halves("red", "blue")
    base = edit(qwen_edit, red_blue, steps=2)
    qwen_edit.add_adapter("mine", qwen_edit.read_adapter("mine", path))
    try:
        adapted = edit(qwen_edit, red_blue, steps=2, adapters=(AdapterRef("mine", 1.0),))
        assert (adapted != base).mean() > 0.05
        assert np.array_equal(edit(qwen_edit, red_blue, steps=2), base)
    finally:
        qwen_edit.remove_adapters(["mine"])
    write_adapter(flux.pipe.transformer, tmp_path / "flux1.safetensors")
    with pytest.raises(AdapterFamilyError, match="Qwen-Image-Edit"):
        qwen_edit.read_adapter("flux1", str(tmp_path / "flux1.safetensors"))


# --- every family: cancellation and the replica's memory measurement

FAMILY_ENGINES = {  # fixture -> (guidance it runs with, conditioning it needs)
    "flux": (3.5, False),
    "klein": (1.0, False),
    "qwen": (4.0, False),
    "qwen_edit": (4.0, True),
}


@pytest.mark.parametrize("fixture", list(FAMILY_ENGINES))
def test_every_family_stops_a_call_whose_requests_all_went_away(fixture, request):
    """The request goes away after step 1: the call stops at the next step boundary, and the
    engine then serves the same request again as if nothing had happened."""
    import threading

    from serve_app.contract import GenerationCancelled

    engine = request.getfixturevalue(fixture)
    guidance, needs_image = FAMILY_ENGINES[fixture]
    inputs = {"conditioning": (halves("red", "blue"),)} if needs_image else {}
    cancel, steps = threading.Event(), []

    def on_step(step, total, *_):
        steps.append(step)
        if step == 1:
            cancel.set()

    job = make_job(steps=6, guidance=guidance, cancel=cancel, **inputs)
    with pytest.raises(GenerationCancelled):
        engine.generate([job], on_step)
    assert steps == [0, 1]
    fresh = dict(steps=3, guidance=guidance, **inputs)
    assert np.array_equal(run(engine, **fresh), run(engine, **fresh))


class TensorBytesProbe:
    """The bytes of tensors live during the call (the plan's counter on real tensors), on a
    device of `capacity` bytes: a CPU stand-in for CUDA's peak-memory statistics."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.peaks: list[int] = []

    def peak_bytes(self, run) -> int:
        from serve_app import memory_plan as mp

        live = mp.LiveBytes()
        with mp.tracking(live):
            run()
        self.peaks.append(live.peak)
        return live.peak

    def capacity_bytes(self) -> int:
        return self.capacity


@pytest.mark.parametrize("fixture", list(FAMILY_ENGINES))
def test_every_family_measures_its_memory_fit_at_warm_up(fixture, request):
    """The replica's measurement (an edit of one image, then of two, at the warm-up size) runs
    on every family and gives a line whose cap follows the device's capacity."""
    engine = request.getfixturevalue(fixture)
    probe = TensorBytesProbe(capacity=1)
    config = engine.config
    engine.config = config.model_copy(update={"warmup_sizes": ["64x64"]})
    try:
        fit, size = engine.measure_memory(probe)
    finally:
        engine.config = config
    one, two = probe.peaks
    assert size == (64, 64) and two > one > 0
    assert fit.bytes_per_pixel > 0
    roomy = fit.base_bytes + 10.5 * fit.bytes_per_pixel * 64 * 64
    bigger = type(fit)(fit.base_bytes, fit.bytes_per_pixel, int(roomy / fit.headroom) + 1)
    assert fit.max_images(64, 64) == 0 and bigger.max_images(64, 64) == 10


class Preloaded:
    """An `engine_cls` handing the model replica an engine the module already loaded."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __call__(self, config):
        return self

    def load(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.mark.parametrize("fixture", list(FAMILY_ENGINES))
def test_every_family_is_moderated_and_marked(fixture, request, moderation_models):
    """The replica's checks and marks do not depend on the family: a blocked prompt and a
    flagged input are refused, the outputs are classified before encoding, and every image
    carries the IPTC source type and the model in EXIF Software."""
    from serve_app.config import SafetyConfig
    from serve_app.model import ImageModel
    from tests.moderation_models import red_image
    from tests.unit.conftest import Recorder

    engine = request.getfixturevalue(fixture)
    guidance, needs_image = FAMILY_ENGINES[fixture]
    safety = SafetyConfig(
        enabled=True,
        blocked_terms=["gore"],
        image_classifier={"source": moderation_models["image"], "flagged_labels": ["nsfw"],
                          "threshold": 0.5},
    )  # fmt: skip
    config = engine.config.model_copy(update={"warmup": False, "safety": safety})
    replica = ImageModel(config.model_dump(), engine_cls=Preloaded(engine))
    replica.metrics.moderation_seconds = Recorder()
    # (the tiny classifier flags mostly-red images: this canvas is checked as the input)
    inputs = {"conditioning": (halves("white", "blue"),)} if needs_image else {}
    job = make_job(steps=2, guidance=guidance, seeds=(1, 2), **inputs)

    result = asyncio.run(replica.generate(job))
    assert len(result.images) == 2
    for data in result.images:
        assert b"trainedAlgorithmicMedia" in data
        assert config.id in Image.open(io.BytesIO(data)).getexif()[0x0131]
    stages = [tags["stage"] for _, tags in replica.metrics.moderation_seconds.calls]
    assert "outputs" in stages and "prompt" in stages
    for refused in (
        replace(job, prompt="some gore"),
        replace(job, moderation_inputs=(red_image(),)),
    ):
        with pytest.raises(APIError) as info:
            asyncio.run(replica.generate(refused))
        assert info.value.code == "moderation_blocked"
