"""FLUX.1 families: Kontext [dev] (instruction edits on a reference canvas) and [dev]/[schnell]
(text-to-image; edits and variations as image-to-image, masked edits as inpainting).

Both share the transformer (FluxTransformer2DModel), the CLIP + T5 text encoders and the 16-channel
VAE, so the tiny and synthetic builds are the same components under another pipeline class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.config import ModelConfig
from serve_app.contract import ModelRequest
from serve_app.families.base import FamilyRunner, PerImage, image_to_image_steps


class _Flux1Runner(FamilyRunner):
    """What both FLUX.1 families share: T5 counts the prompt; LoRA files may be kohya's."""

    def text_tokenizer(self, pipe: Any) -> Any:
        return pipe.tokenizer_2  # T5: what max_sequence_length limits (CLIP sees 77, truncated)

    def lora_state_dict(self, path: str) -> tuple[dict, dict | None]:
        return self.pipeline_class().lora_state_dict(path, return_alphas=True)


class FluxKontextRunner(_Flux1Runner):
    """`FluxKontextPipeline`; masked edits run `FluxKontextInpaintPipeline` over the same
    modules. The conditioning canvas arrives at its final size, so neither resizes it again."""

    family = "flux-kontext"
    pipeline_class_name = "FluxKontextPipeline"
    tiny_version = "1"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.inpaint_pipe: Any = None

    def build_tiny(self) -> Any:
        from serve_app.tiny import build_tiny_pipeline

        return build_tiny_pipeline()

    def build_synthetic(self, device: str, dtype: Any, overrides: dict | None = None) -> Any:
        from serve_app.synthetic import build_pipeline

        return build_pipeline(device, dtype, overrides, self.pipeline_class())

    def attach(self, pipe: Any) -> None:
        from diffusers import FluxKontextInpaintPipeline

        self.pipe = pipe
        self.inpaint_pipe = FluxKontextInpaintPipeline.from_pipe(pipe)
        self.inpaint_pipe.set_progress_bar_config(disable=True)

    def call(
        self, requests: Sequence[ModelRequest], per_image: PerImage, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        first = requests[0]
        kwargs["max_area"] = first.width * first.height  # stop Kontext rescaling to 1 MP
        if first.masked:
            kwargs.update(
                image=per_image(request.init_image for request in requests),
                mask_image=per_image(request.mask for request in requests),
                image_reference=per_image(request.conditioning[0] for request in requests),
                strength=1.0,
                _auto_resize=False,
            )
            return self.inpaint_pipe, kwargs
        if first.conditioning:
            kwargs.update(
                image=per_image(request.conditioning[0] for request in requests), _auto_resize=False
            )
        return self.pipe, kwargs


class FluxRunner(_Flux1Runner):
    """`FluxPipeline` (FLUX.1 [dev] and [schnell]) for text-to-image; `FluxImg2ImgPipeline` for
    edits and variations (the input re-noised by `image_strength`), `FluxInpaintPipeline` for
    masked edits (the masked region regenerated from noise), both over the same modules."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    tiny_version = "1"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.strength = config.image_strength
        self.img2img_pipe: Any = None
        self.inpaint_pipe: Any = None

    def build_tiny(self) -> Any:
        from diffusers import FluxPipeline

        from serve_app.tiny import build_tiny_pipeline

        return FluxPipeline(**build_tiny_pipeline().components)

    def build_synthetic(self, device: str, dtype: Any, overrides: dict | None = None) -> Any:
        from serve_app.synthetic import build_pipeline

        return build_pipeline(device, dtype, overrides, self.pipeline_class())

    def attach(self, pipe: Any) -> None:
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

        self.pipe = pipe
        self.img2img_pipe = FluxImg2ImgPipeline.from_pipe(pipe)
        self.inpaint_pipe = FluxInpaintPipeline.from_pipe(pipe)
        for variant in (self.img2img_pipe, self.inpaint_pipe):
            variant.set_progress_bar_config(disable=True)

    def call(
        self, requests: Sequence[ModelRequest], per_image: PerImage, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        first = requests[0]
        if first.masked:
            # Strength 1: the masked region starts from noise; outside it the pipeline keeps
            # the input's latents each step, and the engine composites its pixels back.
            kwargs.update(
                image=per_image(request.init_image for request in requests),
                mask_image=per_image(request.mask for request in requests),
                strength=1.0,
            )
            return self.inpaint_pipe, kwargs
        if first.conditioning:
            kwargs.update(
                image=per_image(request.conditioning[0] for request in requests),
                strength=self.strength,
                num_inference_steps=image_to_image_steps(first.steps, self.strength),
            )
            return self.img2img_pipe, kwargs
        return self.pipe, kwargs
