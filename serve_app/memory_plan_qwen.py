"""Device memory of a Qwen-Image or Qwen-Image-Edit call, planned on a CPU with fake tensors.

The Qwen family's walk for `serve_app.memory_plan` (which walks FLUX.1's): the published
architecture (`families.qwen_image_build`) built under `FakeTensorMode`, and one call walked
phase by phase as `QwenImagePipeline` / `QwenImageEditPipeline` run it, with true CFG on (the
model card's default, and the larger case: the negative prompt's embeddings and its velocity are
live beside the prompt's):

1. text encoder, once for the prompt and once for the negative prompt: for edits the Qwen2.5-VL
   vision tower over the input at ~1 MP (its windowed attention walked as full attention, an
   upper bound), then the 28-layer LM over the template, prompt and vision tokens with every
   layer's hidden states kept (`output_hidden_states=True`, as the pipeline asks);
2. for edits, the VAE encode of each input (one image at a time: a generator per image);
3. one denoising step with the previous step's velocity live (the engine's preview hook keeps
   it): the prompt's pass, then the negative prompt's, their combination and norm rescale;
4. the VAE decode of the batch.

Only the vision tower is walked by hand (its `forward` computes window indices from data, which
fake tensors do not have): patch embedding, 32 blocks and the 2x2 merger, each block's attention
as one SDPA over all patches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

from serve_app import memory_plan as mp

TEXT_TOKENS = 512  # the pipelines' max_sequence_length: the prompt's tokens after the template
EDIT_AREA = 1024 * 1024  # QwenImageEditPipeline resizes every input to about this many pixels
# Tasks of the Qwen families: text-to-image (qwen-image), and an instruction edit whose input
# joins the sequence and the text encoder (qwen-image-edit).
TASKS = {"generations": 0, "edits-1": 1}


def build_model(
    dtype: Any, weights: str = "bf16", lora_rank: int = 0, configs: dict | None = None
) -> dict[str, Any]:
    """Qwen-Image's three weighted components (Qwen-Image-Edit's are the same) in `dtype` on
    the CPU, under whatever tensor mode is active (fake: nothing allocated); `configs` replaces
    the published config values per component (`component_configs` of another model)."""
    from serve_app.families.qwen_image_build import build_components

    components = build_components("cpu", dtype, configs)
    for module in components.values():
        module.eval().requires_grad_(False)
    if lora_rank:
        mp.add_lora(components["transformer"], lora_rank)
    if weights == "fp8":
        mp.to_float8(components["transformer"])
    elif weights != "bf16":
        raise ValueError(f"weights must be bf16 or fp8, got {weights!r}")
    return components


def edit_input_size(width: int, height: int) -> tuple[int, int]:
    """The size QwenImageEditPipeline resizes an input of the output's aspect to
    (`calculate_dimensions(1024 * 1024, ratio)`: about 1 MP, sides multiples of 32)."""
    ratio = width / height
    side = math.sqrt(EDIT_AREA * ratio)
    return round(side / 32) * 32, round(side / ratio / 32) * 32


def _walk_vision(visual: Any, width: int, height: int) -> Any:
    """The vision tower over one image: patches -> blocks -> merged tokens (B=1)."""
    import torch
    import torch.nn.functional as F

    config = visual.config
    patch, merge = config.patch_size, config.spatial_merge_size
    grid_h = height // patch // merge * merge
    grid_w = width // patch // merge * merge
    patches = grid_h * grid_w
    channels = config.in_channels * config.temporal_patch_size * patch * patch
    dtype = visual.patch_embed.proj.weight.dtype
    pixels = torch.zeros(patches, channels, dtype=dtype)
    hidden = visual.patch_embed(pixels)
    del pixels
    heads = config.num_heads
    for block in visual.blocks:
        normed = block.norm1(hidden)
        qkv = block.attn.qkv(normed).reshape(patches, 3, heads, -1).permute(1, 2, 0, 3)
        del normed
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        del qkv
        attended = attended.transpose(0, 1).reshape(patches, -1)
        hidden = hidden + block.attn.proj(attended)
        del attended
        hidden = hidden + block.mlp(block.norm2(hidden))
    return visual.merger(hidden)


def _encode_text(text_encoder: Any, batch: int, tokens: int, vision: Any | None) -> Any:
    """The LM over `tokens` text tokens (+ the vision tokens), every layer's states kept, as the
    pipeline calls it; returns the prompt embeddings it keeps (the last layer's)."""
    import torch

    lm = text_encoder.model.language_model
    dtype = lm.embed_tokens.weight.dtype
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    embeds = lm.embed_tokens(ids)
    del ids
    if vision is not None:  # the image's tokens take the place of its pad tokens
        embeds = torch.cat([embeds, vision.to(dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
    length = embeds.shape[1]
    positions = torch.zeros(3, batch, length, dtype=torch.long)  # M-RoPE: (t, h, w) ids
    out = lm(inputs_embeds=embeds, position_ids=positions, output_hidden_states=True)
    del embeds, positions
    last = out.hidden_states[-1]
    del out
    return last.clone()  # the pipeline's split, drop and re-stack: a new tensor


def walk_call(
    components: dict[str, Any],
    live: mp.LiveBytes,
    *,
    width: int,
    height: int,
    batch: int,
    conditioning_images: int = 0,
    flops: dict[str, int] | None = None,
) -> None:
    """One engine call of a Qwen family (module docstring), `live` told each phase."""
    import torch
    from diffusers import QwenImagePipeline as Pipe

    text_encoder, transformer, vae = (
        components["text_encoder"], components["transformer"], components["vae"],
    )  # fmt: skip
    dtype = transformer.dtype
    edit = bool(conditioning_images)
    in_w, in_h = edit_input_size(width, height) if edit else (0, 0)
    channels = transformer.config.in_channels // 4
    lat_h, lat_w = 2 * (height // 16), 2 * (width // 16)
    call = cast(Callable[..., Any], transformer)
    other, step = mp._counter(flops is not None), mp._counter(flops is not None)

    with torch.no_grad():
        live.enter("text_encoder")
        embeds = []
        with other:
            for _ in ("prompt", "negative prompt"):
                vision = _walk_vision(text_encoder.model.visual, in_w, in_h) if edit else None
                embeds.append(_encode_text(text_encoder, batch, TEXT_TOKENS, vision))
                del vision
        prompt_embeds, negative_embeds = embeds
        del embeds

        image_latents = None
        if edit:
            live.enter("vae_encode")
            with other:
                image = torch.zeros(batch, 3, 1, in_h, in_w, dtype=dtype)
                encoded = [vae.encode(image[i : i + 1]).latent_dist.mode() for i in range(batch)]
                del image
                cat = torch.cat(encoded, dim=0)
                del encoded
                cat = (cat - 0.5) / 2.0  # normalised by the per-channel mean and std
                flat = cat[:, :, 0]
                image_latents = Pipe._pack_latents(flat, batch, channels, *flat.shape[2:])
                del flat
                del cat

        live.enter("denoise")
        noise = torch.randn(batch, channels, lat_h, lat_w, dtype=dtype)
        latents = Pipe._pack_latents(noise, batch, channels, lat_h, lat_w)
        del noise
        shapes = [(1, lat_h // 2, lat_w // 2)] + ([(1, in_h // 16, in_w // 16)] if edit else [])
        img_shapes = [shapes] * batch
        velocity = torch.empty(  # the previous step's, held by the engine's preview hook
            batch, latents.shape[1] + (0 if image_latents is None else image_latents.shape[1]),
            transformer.config.out_channels * 4, dtype=dtype,
        )  # fmt: skip
        model_input = latents if image_latents is None else torch.cat([latents, image_latents], 1)
        timestep = torch.full([batch], 0.5, dtype=dtype)
        predictions: list[Any] = []
        with step:
            for embeddings in (prompt_embeds, negative_embeds):
                output = call(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=embeddings,
                    encoder_hidden_states_mask=None,
                    img_shapes=img_shapes,
                    return_dict=False,
                )[0]
                if not predictions:
                    velocity = output  # the hook keeps the step's first pass
                predictions.append(output[:, : latents.size(1)])
                del output
        del model_input, timestep
        cond, uncond = predictions
        del predictions
        combined = uncond + 4.0 * (cond - uncond)
        norm = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
        noise_pred = combined * norm
        del cond, uncond, combined, norm
        latents = (latents.to(torch.float32) + (-1.0 / mp.STEPS) * noise_pred).to(dtype)
        del noise_pred, velocity

        live.enter("vae_decode")
        with other:
            unpacked = Pipe._unpack_latents(latents, height, width, 8)  # (B, C, 1, H/8, W/8)
            decoded = vae.decode(unpacked, return_dict=False)[0][:, :, 0]
            del unpacked
            images = (decoded / 2 + 0.5).clamp(0, 1)
            del decoded, images
        live.enter("done")
        del prompt_embeds, negative_embeds, image_latents, latents
    if flops is not None:
        flops["step"] = step.total()
        flops["other"] = other.total()


def component_configs(pipe: Any) -> dict[str, dict[str, Any]]:
    """The config values of a loaded pipeline's components (the tiny model's, in tests), in the
    form `build_model(configs=...)` takes."""
    text = pipe.text_encoder.config
    return {
        "transformer": {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")},
        "text_encoder": {
            "text_config": text.text_config.to_dict(),
            "vision_config": text.vision_config.to_dict(),
            **{
                k: getattr(text, k)
                for k in (
                    "image_token_id",
                    "video_token_id",
                    "vision_start_token_id",
                    "vision_end_token_id",
                )
            },
        },  # fmt: skip
    }


ARCHITECTURE_FIELDS = (
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "in_channels",
)


def architecture() -> dict[str, Any]:
    """The transformer config fields a replica checks before trusting a Qwen plan."""
    from serve_app.families.qwen_image_build import TRANSFORMER

    return {field: TRANSFORMER[field] for field in ARCHITECTURE_FIELDS}


def image_tokens_in_call(width: int, height: int, conditioning_images: int) -> int:
    """Image tokens one image of a call puts in the transformer's sequence: the output's
    patches, and an edit's input at ~1 MP."""
    tokens = (width // 16) * (height // 16)
    if conditioning_images:
        in_w, in_h = edit_input_size(width, height)
        tokens += (in_w // 16) * (in_h // 16)
    return tokens
