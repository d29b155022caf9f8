"""Qwen-Image (text-to-image): `QwenImagePipeline`; edits and variations as image-to-image
(`QwenImageImg2ImgPipeline`), masked edits as inpainting (`QwenImageInpaintPipeline`), both made
with `from_pipe` over the same modules.

What differs from FLUX.1: true classifier-free guidance (`guidance` is `true_cfg_scale`, on
above 1 with the configured negative prompt: two transformer passes per step), a Qwen2.5-VL text
encoder whose prompt template's prefix is dropped, and a video VAE (latents with a frame axis,
normalised by per-channel mean and std).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.contract import ModelRequest
from serve_app.families.base import FamilyRunner, PerImage, image_to_image_steps
from serve_app.families.qwen_image_build import TINY_VERSION


class QwenImageRunner(FamilyRunner):
    family = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    tiny_version = TINY_VERSION

    img2img_pipe: Any = None
    inpaint_pipe: Any = None
    _template = "{}"
    _template_prefix = 0  # tokens of the template before the prompt, which the pipeline drops

    def build_tiny(self) -> Any:
        from serve_app.families.qwen_image_build import build_tiny_pipeline

        return build_tiny_pipeline()

    def build_synthetic(self, device: str, dtype: Any, overrides: dict | None = None) -> Any:
        from serve_app.families.qwen_image_build import build_synthetic_pipeline

        return build_synthetic_pipeline(device, dtype, overrides)

    def attach(self, pipe: Any) -> None:
        from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

        self.pipe = pipe
        self.img2img_pipe = QwenImageImg2ImgPipeline.from_pipe(pipe)
        self.inpaint_pipe = QwenImageInpaintPipeline.from_pipe(pipe)
        for variant in (self.img2img_pipe, self.inpaint_pipe):
            variant.set_progress_bar_config(disable=True)

    def text_tokenizer(self, pipe: Any) -> Any:
        self._template = pipe.prompt_template_encode
        self._template_prefix = pipe.prompt_template_encode_start_idx
        return pipe.tokenizer

    def count_tokens(self, tokenizer: Any, prompt: str) -> int:
        """Tokens of the prompt as the text encoder's output keeps them: the template around
        it, less the prefix the pipeline drops (its system message)."""
        ids = tokenizer(self._template.format(prompt), truncation=False).input_ids
        return len(ids) - self._template_prefix

    def call(
        self, requests: Sequence[ModelRequest], per_image: PerImage, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        first = requests[0]
        # Qwen-Image is not guidance-distilled: `guidance` is true CFG, on above 1 (the
        # pipeline runs it only with a negative prompt, so one is always given then).
        guidance = kwargs.pop("guidance_scale")
        kwargs["true_cfg_scale"] = guidance
        if guidance > 1:
            kwargs["negative_prompt"] = [self.config.negative_prompt] * len(kwargs["prompt"])
        if first.masked:
            kwargs.update(
                image=per_image(request.init_image for request in requests),
                mask_image=per_image(request.mask for request in requests),
                strength=1.0,
            )
            return self.inpaint_pipe, kwargs
        if first.conditioning:
            kwargs.update(
                image=per_image(request.conditioning[0] for request in requests),
                strength=self.config.image_strength,
                num_inference_steps=image_to_image_steps(first.steps, self.config.image_strength),
            )
            return self.img2img_pipe, kwargs
        return self.pipe, kwargs

    # Latents: packed tokens (B, H/16 * W/16, 64) unpack to the video VAE's (B, 16, 1, H/8,
    # W/8); previews work on the single frame, normalised by the VAE's per-channel statistics.

    def unpack_latents(self, pipe: Any, packed: Any, width: int, height: int) -> Any:
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)[:, :, 0]

    def _statistics(self, pipe: Any, like: Any) -> tuple[Any, Any]:
        import torch

        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def decode(self, pipe: Any, latents: Any) -> Any:
        mean, std = self._statistics(pipe, latents)
        frames = (latents * std + mean)[:, :, None].to(pipe.vae.dtype)
        return pipe.vae.decode(frames, return_dict=False)[0][:, :, 0]

    def encode(self, pipe: Any, pixels: Any) -> Any:
        latents = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = self._statistics(pipe, latents)
        return (latents - mean) / std


class QwenImageEditRunner(QwenImageRunner):
    """Qwen-Image-Edit: `QwenImageEditPipeline`, an instruction-editing model on Qwen-Image's
    transformer and VAE. The input image conditions twice: its VAE latents join the sequence
    (as Kontext's do) and the Qwen2.5-VL encoder sees it beside the prompt (vision tokens).
    The pipeline resizes every input to ~1 MP of its aspect; the family's preferred
    resolutions are that resize's fixed points, so a prepared canvas is not resized again. Edits
    and variations only (the family serves no generations, and no masks: `FamilyTraits`)."""

    family = "qwen-image-edit"
    pipeline_class_name = "QwenImageEditPipeline"

    def load(self, source: str, dtype: Any) -> Any:
        """`from_pretrained` with the processor read by `load_processor` (transformers cannot
        load a `Qwen2VLProcessor` without torchvision); a hub id is the snapshot it names."""
        from pathlib import Path

        from serve_app.families.qwen_image_build import load_processor

        folder = Path(source)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source))
        return self.pipeline_class().from_pretrained(
            folder, dtype=dtype, processor=load_processor(folder)
        )

    def build_tiny(self) -> Any:
        from serve_app.families.qwen_image_build import build_tiny_pipeline

        return build_tiny_pipeline(edit=True)

    def build_synthetic(self, device: str, dtype: Any, overrides: dict | None = None) -> Any:
        from serve_app.families.qwen_image_build import build_synthetic_pipeline

        return build_synthetic_pipeline(device, dtype, overrides, edit=True)

    def attach(self, pipe: Any) -> None:
        self.pipe = pipe

    def call(
        self, requests: Sequence[ModelRequest], per_image: PerImage, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        first = requests[0]
        if not first.conditioning or first.masked:  # the ingress refuses both (FamilyTraits)
            raise ValueError("Qwen-Image-Edit runs edits of one conditioning image, no mask")
        guidance = kwargs.pop("guidance_scale")
        kwargs["true_cfg_scale"] = guidance
        if guidance > 1:
            kwargs["negative_prompt"] = [self.config.negative_prompt] * len(kwargs["prompt"])
        # One input image per prompt (each the call's canvas size: `group_key`); the pipeline
        # encodes each with its own generator and shows each to the text encoder.
        kwargs["image"] = per_image(request.conditioning[0] for request in requests)
        return self.pipe, kwargs
