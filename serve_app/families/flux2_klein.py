"""FLUX.2 [klein] 4B: `Flux2KleinPipeline` for text-to-image and reference edits,
`Flux2KleinInpaintPipeline` (over the same modules) for masked edits.

What differs from FLUX.1: 32-channel latents normalised with the VAE's batch-norm statistics and
packed 2x2 (128 per token), a Qwen3 text encoder whose prompt is wrapped in its chat template,
no guidance (klein-4B is step-distilled: `guidance_scale` is ignored), and reference images
shared by every prompt of a call (`image=[...]` is one set for the call), so only requests with
the same references share one (`FamilyTraits.references_per_call`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.contract import ModelRequest
from serve_app.families.base import FamilyRunner, PerImage
from serve_app.families.flux2_klein_build import TINY_VERSION


class Flux2KleinRunner(FamilyRunner):
    family = "flux2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    tiny_version = TINY_VERSION

    inpaint_pipe: Any = None

    def build_tiny(self) -> Any:
        from serve_app.families.flux2_klein_build import build_tiny_pipeline

        return build_tiny_pipeline()

    def build_synthetic(self, device: str, dtype: Any, overrides: dict | None = None) -> Any:
        from serve_app.families.flux2_klein_build import build_synthetic_pipeline

        return build_synthetic_pipeline(device, dtype, overrides)

    def attach(self, pipe: Any) -> None:
        from diffusers import Flux2KleinInpaintPipeline

        self.pipe = pipe
        self.inpaint_pipe = Flux2KleinInpaintPipeline.from_pipe(pipe)
        self.inpaint_pipe.set_progress_bar_config(disable=True)

    def text_tokenizer(self, pipe: Any) -> Any:
        return pipe.tokenizer

    def count_tokens(self, tokenizer: Any, prompt: str) -> int:
        """Tokens of the prompt in Qwen3's chat template, as the pipeline encodes it (the
        template's 12 tokens count toward `max_sequence_length`)."""
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        return len(tokenizer(text, truncation=False).input_ids)

    def call(
        self, requests: Sequence[ModelRequest], per_image: PerImage, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        first = requests[0]
        if first.masked:
            # The masked region from noise (strength 1), the canvas as the shared reference.
            kwargs.update(
                image=per_image(request.init_image for request in requests),
                mask_image=per_image(request.mask for request in requests),
                image_reference=[first.conditioning[0]],
                strength=1.0,
            )
            return self.inpaint_pipe, kwargs
        if first.conditioning:
            kwargs["image"] = [first.conditioning[0]]  # one reference set for the whole call
        return self.pipe, kwargs

    # Latents: packed tokens (B, H/16 * W/16, 128) are the batch-normalised, 2x2-patchified VAE
    # latents in row-major order; previews work in that (B, 128, H/16, W/16) space.

    def unpack_latents(self, pipe: Any, packed: Any, width: int, height: int) -> Any:
        batch, _, channels = packed.shape
        return packed.reshape(batch, height // 16, width // 16, channels).permute(0, 3, 1, 2)

    def _statistics(self, pipe: Any, like: Any) -> tuple[Any, Any]:
        import torch

        bn = pipe.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        return mean, std.to(like.device, like.dtype)

    def decode(self, pipe: Any, latents: Any) -> Any:
        mean, std = self._statistics(pipe, latents)
        latents = pipe._unpatchify_latents(latents * std + mean)
        return pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]

    def encode(self, pipe: Any, pixels: Any) -> Any:
        latents = pipe._patchify_latents(pipe.vae.encode(pixels).latent_dist.mode())
        mean, std = self._statistics(pipe, latents)
        return (latents - mean) / std
