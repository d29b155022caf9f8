"""Device memory of a FLUX.2 [klein] 4B call, planned on a CPU with fake tensors.

The klein family's walk for `serve_app.memory_plan` (which walks FLUX.1's): the published
architecture (`families.flux2_klein_build`) built under `FakeTensorMode`, and one call walked
phase by phase as `Flux2KleinPipeline` runs it (step-distilled: no guidance, one transformer pass
a step):

1. text encoder: Qwen3-4B over the chat-templated prompt padded to 512 tokens, every layer's
   hidden states kept (`output_hidden_states=True`), layers 9, 18 and 27 stacked into the
   prompt embeddings (3 x 2,560 wide);
2. for edits, the VAE encode of the reference (one set per call: the pipeline encodes it once
   and repeats its tokens for every image), patchified and normalised;
3. one denoising step with the previous velocity live (the engine's preview hook keeps it), the
   reference's tokens appended to the sequence;
4. the VAE decode of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from serve_app import memory_plan as mp

TEXT_TOKENS = 512  # max_sequence_length: the pipeline pads every prompt to it
LAYERS = (9, 18, 27)  # the text encoder's hidden states the pipeline stacks
TASKS = {"generations": 0, "edits-1": 1}


def build_model(
    dtype: Any, weights: str = "bf16", lora_rank: int = 0, configs: dict | None = None
) -> dict[str, Any]:
    """FLUX.2 [klein] 4B's three weighted components in `dtype` on the CPU, under whatever tensor
    mode is active (fake: nothing allocated); `configs` replaces published values per
    component. fp8 is not a switch of the family."""
    from serve_app.families.flux2_klein_build import build_components

    if weights != "bf16":
        raise ValueError(f"FLUX.2 [klein] plans bf16 weights only, got {weights!r}")
    components = build_components("cpu", dtype, configs)
    for module in components.values():
        module.eval().requires_grad_(False)
    if lora_rank:
        mp.add_lora(components["transformer"], lora_rank)
    return components


def component_configs(pipe: Any) -> dict[str, dict[str, Any]]:
    """The config values of a loaded pipeline's components (the tiny model's, in tests)."""
    text = pipe.text_encoder.config.to_dict()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_parameters",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "pad_token_id")  # fmt: skip
    return {
        "transformer": {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")},
        "text_encoder": {k: text[k] for k in keep if k in text},
    }


def architecture() -> dict[str, Any]:
    """The transformer config fields a replica checks before trusting a klein plan."""
    from serve_app.families.flux2_klein_build import TRANSFORMER

    fields = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
              "joint_attention_dim", "in_channels")  # fmt: skip
    return {field: TRANSFORMER[field] for field in fields}


def image_tokens_in_call(width: int, height: int, conditioning_images: int) -> int:
    """Image tokens one image of a call puts in the sequence: the output's patches, and an
    edit's reference canvas (the nearest ~1 MP bucket, as for Kontext)."""
    return mp.image_tokens_in_call(width, height, conditioning_images)


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
    """One engine call of FLUX.2 [klein] (module docstring), `live` told each phase."""
    import torch
    from diffusers import Flux2KleinPipeline as Pipe

    text_encoder, transformer, vae = (
        components["text_encoder"], components["transformer"], components["vae"],
    )  # fmt: skip
    dtype = transformer.dtype
    channels = transformer.config.in_channels  # 128: 32 latent channels, 2x2 patchified
    lat_h, lat_w = height // 16, width // 16
    call = cast(Callable[..., Any], transformer)
    other, step = mp._counter(flops is not None), mp._counter(flops is not None)

    with torch.no_grad():
        live.enter("text_encoder")
        with other:
            ids = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long)
            mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
            out = text_encoder(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
            )
            del ids, mask
            states = cast(tuple[Any, ...], out.hidden_states)
            stacked = torch.stack([states[k] for k in LAYERS], dim=1)
            del out, states  # the pipeline keeps only the stacked layers
            prompt_embeds = stacked.permute(0, 2, 1, 3).reshape(batch, TEXT_TOKENS, -1)
            del stacked
            text_ids = torch.zeros(batch, TEXT_TOKENS, 4, dtype=torch.long)

        references = reference_ids = None
        if conditioning_images:
            live.enter("vae_encode")
            with other:
                canvas_w, canvas_h = mp.canvas_size(width, height, conditioning_images) or (0, 0)
                image = torch.zeros(1, 3, canvas_h, canvas_w, dtype=dtype)
                encoded = vae.encode(image).latent_dist.mode()
                del image
                patches = Pipe._patchify_latents(encoded)
                del encoded
                packed = patches.flatten(2).transpose(1, 2)  # (1, tokens, 128)
                del patches
                references = packed.repeat(batch, 1, 1)
                del packed
                reference_ids = torch.zeros(batch, references.shape[1], 4, dtype=torch.long)

        live.enter("denoise")
        noise = torch.randn(batch, channels, lat_h, lat_w, dtype=dtype)
        latents = noise.flatten(2).transpose(1, 2).contiguous()
        del noise
        latent_ids = torch.zeros(batch, lat_h * lat_w, 4, dtype=torch.long)
        if references is not None and reference_ids is not None:
            model_input = torch.cat([latents, references], dim=1)
            image_ids = torch.cat([latent_ids, reference_ids], dim=1)
        else:
            model_input, image_ids = latents, latent_ids
        velocity = torch.empty(  # the previous step's, held by the engine's preview hook
            batch, model_input.shape[1], channels, dtype=dtype
        )
        timestep = torch.full([batch], 0.5, dtype=dtype)
        with step:
            velocity = call(
                hidden_states=model_input,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
        del model_input, timestep, image_ids
        noise_pred = velocity[:, : latents.size(1)]
        latents = (latents.to(torch.float32) + (-1.0 / mp.STEPS) * noise_pred).to(dtype)
        del noise_pred, velocity

        live.enter("vae_decode")
        with other:
            unpacked = latents.transpose(1, 2).reshape(batch, channels, lat_h, lat_w)
            decoded = vae.decode(Pipe._unpatchify_latents(unpacked), return_dict=False)[0]
            del unpacked
            images = (decoded / 2 + 0.5).clamp(0, 1)
            del decoded, images
        live.enter("done")
        del prompt_embeds, text_ids, references, reference_ids, latents, latent_ids
    if flops is not None:
        flops["step"] = step.total()
        flops["other"] = other.total()
