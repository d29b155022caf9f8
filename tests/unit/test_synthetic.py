"""The synthetic model's architecture is FLUX.1-Kontext-dev's: parameter counts equal the
published checkpoints' (bf16 safetensors sizes / 2), built on the meta device in seconds."""

import json

import numpy as np
import pytest
import torch

from serve_app.synthetic import (
    CLIP_BOS,
    CLIP_EOS,
    CLIP_TEXT,
    T5_ENCODER,
    build_pipeline,
    build_tokenizers,
    flops_per_step,
    main,
    param_counts,
)

# transformer: 23,802,816,640 bytes of bf16 (diffusion_pytorch_model.safetensors.index.json);
# text_encoder_2: 9,524,621,312 bytes (T5-v1.1-XXL encoder); CLIP ViT-L/14 text tower; FLUX VAE.
PUBLISHED = {
    "transformer": 23_802_816_640 // 2,
    "text_encoder": 123_060_480,
    "text_encoder_2": 9_524_621_312 // 2,
    "vae": 83_819_683,
}


def test_parameter_counts_match_the_real_model(capsys):
    assert param_counts() == PUBLISHED
    assert main(["--param-counts"]) == 0
    assert json.loads(capsys.readouterr().out) == PUBLISHED


def test_flux1_dev_and_schnell_parameter_counts(capsys):
    """FLUX.1 [dev] is Kontext's network (23,802,816,640 bytes of bf16 in its transformer's
    safetensors index); [schnell] lacks the guidance embedder: 23,782,357,120 bytes."""
    assert param_counts("flux1-dev") == PUBLISHED
    assert main(["--param-counts", "flux1-schnell"]) == 0
    schnell = json.loads(capsys.readouterr().out)
    assert schnell == {**PUBLISHED, "transformer": 23_782_357_120 // 2}
    with pytest.raises(SystemExit):
        main(["--param-counts", "sdxl"])


# The real depths (19 + 38 transformer blocks, 24 T5 layers, 12 CLIP layers) at narrow widths:
# what keeps activations finite over depth and steps is the depth scaling, which this runs.
NARROW = {
    "transformer": {
        "num_attention_heads": 1, "joint_attention_dim": 64, "pooled_projection_dim": 64,
    },
    "text_encoder": {
        "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "projection_dim": 64,
    },
    "text_encoder_2": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_heads": 4},
    "vae": {"block_out_channels": [32, 32, 32, 32]},
}  # fmt: skip
# The real widths (3072-wide transformer, 4096-wide T5) at one block each.
SHALLOW = {
    "transformer": {"num_layers": 1, "num_single_layers": 1},
    "text_encoder": {"num_hidden_layers": 1},
    "text_encoder_2": {"num_layers": 1},
    "vae": {"layers_per_block": 1},
}


def _run(pipe, steps: int, prompt: str = "a lighthouse at dawn", size: int = 128):
    """Latents after every step, the transformer's outputs and the final image (numpy)."""
    latents, velocities = [], []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, output: velocities.append(output[0].float())
    )

    def on_step(pipe, step, timestep, tensors):
        latents.append(tensors["latents"].float())
        return tensors

    try:
        image = pipe(
            prompt=prompt,
            width=size,
            height=size,
            max_area=size * size,
            num_inference_steps=steps,
            max_sequence_length=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            callback_on_step_end=on_step,
        ).images[0]
    finally:
        hook.remove()
    return latents, velocities, image


def test_real_depth_stays_finite_in_bf16_through_28_steps():
    pipe = build_pipeline("cpu", torch.bfloat16, NARROW)
    assert len(pipe.transformer.transformer_blocks) == 19
    assert len(pipe.transformer.single_transformer_blocks) == 38
    assert len(pipe.text_encoder_2.encoder.block) == 24
    assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    latents, velocities, image = _run(pipe, steps=28)
    assert len(latents) == 28 and len(velocities) == 28
    for tensor in latents + velocities:
        assert torch.isfinite(tensor).all()
        assert 0.1 < tensor.std() < 10  # neither vanished nor blown up
    assert np.isfinite(image).all() and image.shape == (128, 128, 3)
    assert image.std() > 0.01  # not a flat image


# Without AVX-512 (or AMX) PyTorch multiplies bf16 matrices on the CPU through a fallback about
# 400x slower than float32 (measured on an AVX2 EPYC: 66 s for one 512x4096x4096 product), so a
# real-width block would take many minutes. There the widths run in float32; the depth test
# above still runs bf16 on every CPU.
FAST_BF16 = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")
WIDTH_DTYPE = torch.bfloat16 if FAST_BF16 else torch.float32


def test_real_widths_run_and_each_input_matters():
    """In bf16 where this CPU has native bf16 products (see `WIDTH_DTYPE`)."""
    pipe = build_pipeline("cpu", WIDTH_DTYPE, SHALLOW)
    assert pipe.transformer.dtype == WIDTH_DTYPE
    assert pipe.transformer.config.num_attention_heads * 128 == 3072
    assert pipe.text_encoder_2.config.d_model == 4096
    latents, velocities, image = _run(pipe, steps=2)
    assert all(torch.isfinite(t).all() and 0.1 < t.std() < 10 for t in latents + velocities)
    _, _, other_prompt = _run(pipe, steps=2, prompt="a red bicycle")
    assert not np.array_equal(image, other_prompt)


def test_weights_are_seeded_and_tokenizers_have_the_real_vocabularies():
    first = build_pipeline("cpu", torch.bfloat16, NARROW)
    second = build_pipeline("cpu", torch.bfloat16, NARROW)
    for (name, a), (_, b) in zip(
        first.transformer.state_dict().items(), second.transformer.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    clip, t5 = build_tokenizers()
    assert len(clip) == CLIP_TEXT["vocab_size"] == 49408
    assert len(t5) == 32100 <= T5_ENCODER["vocab_size"]
    ids = clip("a lighthouse at dawn, 4k").input_ids
    assert ids[0] == CLIP_BOS and ids[-1] == CLIP_EOS == max(ids)  # CLIP pools at the max id
    assert max(t5("any text: ünïcödé 🙂").input_ids) < len(t5)


def test_flops_per_step_follow_the_architecture(capsys):
    text_to_image = flops_per_step(1024, 1024)
    edit = flops_per_step(1024, 1024, conditioning_images=1)
    # Per token: 2 x the weights a token passes through (double blocks: one stream's half,
    # modulation excluded) + attention (4 x tokens x width per block).
    tokens, width = 4096 + 512, 3072
    per_token = 2 * (19 * 12 * width**2 + 38 * 12 * width**2)
    attention = 57 * 4 * tokens**2 * width
    assert abs(text_to_image - (tokens * per_token + attention)) / text_to_image < 0.01
    assert 2.2 < edit / text_to_image < 2.3  # twice the image tokens, attention quadratic
    assert main(["--flops", "1024x1024"]) == 0
    assert json.loads(capsys.readouterr().out) == {"text_to_image": text_to_image, "edit": edit}


def test_engine_loads_source_synthetic_on_its_device(monkeypatch):
    """`source: synthetic` goes through the engine's load (no `from_pretrained`, no copy to the
    device): narrowed here, since the full model does not fit a CI machine."""
    from serve_app import synthetic
    from serve_app.config import ModelConfig
    from serve_app.engine import ImageEngine, ModelLoadError
    from tests.conftest import make_job

    built = []

    def narrow_pipeline(device, dtype, overrides=None, pipeline_cls=None):
        built.append((device, dtype))
        return real_build(device, dtype, overrides=NARROW, pipeline_cls=pipeline_cls)

    real_build = synthetic.build_pipeline
    monkeypatch.setattr(synthetic, "build_pipeline", narrow_pipeline)
    config = ModelConfig(id="synthetic", source="synthetic", device="cpu", dtype="bfloat16")
    engine = ImageEngine(config)
    engine.load()
    assert built == [("cpu", torch.bfloat16)]
    [[image]] = engine.generate([make_job(width=128, height=128, steps=3)])
    assert image.size == (128, 128)
    assert engine.count_text_tokens("a lighthouse") > 1

    offload = ModelConfig(id="s", source="synthetic", device="cpu", cpu_offload=True)
    with pytest.raises(ModelLoadError, match="cpu_offload"):
        ImageEngine(offload).load()


def test_flux2_klein_parameter_counts_match_the_published_checkpoint(capsys):
    """Built from the hub configs of black-forest-labs/FLUX.2-klein-4B (sources in
    serve_app/families/flux2_klein_build.py): the transformer's 7.75 GB of bf16, Qwen3-4B's
    4,022,468,096 parameters, the FLUX.2 VAE's 84,046,115."""
    from serve_app.families.flux2_klein_build import PUBLISHED as KLEIN

    assert main(["--param-counts", "flux2-klein-4b"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["text_encoder"] == KLEIN["text_encoder"] and counts["vae"] == KLEIN["vae"]
    assert abs(counts["transformer"] / KLEIN["transformer"] - 1) < 0.001  # 3,875,544,576


def test_qwen_image_parameter_counts_match_the_published_checkpoints(capsys):
    """From the hub configs of Qwen/Qwen-Image and Qwen-Image-Edit (sources in
    serve_app/families/qwen_image_build.py): the 20.43 B MMDiT, Qwen2.5-VL-7B-Instruct's
    8,292,166,656 parameters (vision tower and LM head included, as the repos ship it), the
    VAE's 54 M encoder + 73 M decoder (the Qwen-Image technical report, Table 1)."""
    assert main(["--param-counts", "qwen-image"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["transformer"] == 20_430_401_088
    assert counts["text_encoder"] == 8_292_166_656
    assert counts["vae"] == 126_892_531
    assert round(counts["vae.encoder"] / 1e6) == 54 and round(counts["vae.decoder"] / 1e6) == 73
    assert param_counts("qwen-image-edit") == param_counts("qwen-image")  # the same network
