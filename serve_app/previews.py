"""Streaming previews: the denoised-latent estimate of a running call, decoded to images.

Two decoders: `latent_rgb`, a linear latent -> RGB map fitted on the model's own VAE at load
(~free, blurry, upscaled), and `vae`, the full VAE decode (exact: at the last step it is the
final image). Torch and a loaded FLUX pipeline; no HTTP, no Ray.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


@torch.inference_mode()
def fit_latent_rgb(family, pipe, device: str) -> torch.Tensor:
    """Least-squares linear map (C + 1, 3) from this model's latents (+1) to RGB.

    Encodes a calibration image of random colour blocks with the model's own VAE and fits
    RGB (at latent resolution) ~ [latent, 1] @ W, so it works for any VAE, the tiny one too.
    """
    cell = pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    pixels = torch.from_numpy(blocks.repeat(cell, 0).repeat(cell, 1)).float() / 127.5 - 1
    image = pixels.permute(2, 0, 1)[None].to(device, pipe.vae.dtype)
    latents = family.encode(pipe, image)  # (1, C, h, w) as the transformer sees them
    features = latents[0].permute(1, 2, 0).reshape(-1, latents.shape[1]).float().cpu()
    features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    # One latent pixel per 8x8 (FLUX.1) or, patchified, per 16x16 image pixels (FLUX.2): the
    # blocks at the latents' resolution (each block is 2x2 cells of `cell` pixels).
    stride = blocks.shape[0] // latents.shape[2]
    target = torch.from_numpy(blocks[::stride, ::stride].reshape(-1, 3)).float() / 127.5 - 1
    return torch.linalg.lstsq(features, target).solution


@torch.inference_mode()
def decode_preview(
    family,
    pipe,
    packed_latents: torch.Tensor,
    width: int,
    height: int,
    projection: torch.Tensor | None,
) -> list[Image.Image]:
    """Images from packed latents: the full VAE when `projection` is None, else the linear map."""
    latents = family.unpack_latents(pipe, packed_latents, width, height)
    if projection is None:
        return pipe.image_processor.postprocess(family.decode(pipe, latents), output_type="pil")
    rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), projection[:-1]) + projection[-1]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(p).resize((width, height), Image.Resampling.BILINEAR) for p in pixels]
