"""The engine side of a model family: load or build its pipelines, and turn one call's requests
into the keyword arguments of the right pipeline. Torch and diffusers; no HTTP, no Ray.

`ImageEngine` owns one runner and asks it only what differs between families: which pipeline
class loads a checkpoint, which runs text-to-image, edits and masked edits (variants made with
`from_pipe`, sharing the weights), which tokenizer counts a prompt, and how latents unpack for
previews.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from serve_app.config import ModelConfig
from serve_app.contract import ModelRequest

# Per-image values of a call from per-request ones (a request's value once per seed).
PerImage = Callable[[Any], list[Any]]


class FamilyRunner:
    """One family's pipelines on one replica. Subclasses set the class names and `call`."""

    family = ""
    pipeline_class_name = ""  # the diffusers class a checkpoint of this family loads with
    tiny_version = "1"  # bump when the tiny build recipe changes, so stale caches are not reused

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.pipe: Any = None  # the loaded pipeline (text-to-image or the family's main one)

    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    # --- weights

    def load(self, source: str, dtype: Any) -> Any:
        """The pipeline from a hub id or a directory (`from_pretrained`)."""
        return self.pipeline_class().from_pretrained(source, dtype=dtype)

    def build_tiny(self) -> Any:
        """The embedded tiny pipeline: random weights, real geometry, built offline."""
        raise NotImplementedError

    def build_synthetic(self, device: str, dtype: Any, overrides: dict | None = None) -> Any:
        """The full-size architecture with seeded random weights, built on `device`."""
        raise NotImplementedError

    def attach(self, pipe: Any) -> None:
        """Keep the loaded pipeline and make its variants (`from_pipe`: no second copy)."""
        self.pipe = pipe

    # --- text

    def text_tokenizer(self, pipe: Any) -> Any:
        """The tokenizer whose count the text limit applies to (the engine keeps a copy)."""
        raise NotImplementedError

    def count_tokens(self, tokenizer: Any, prompt: str) -> int:
        return len(tokenizer(prompt, truncation=False).input_ids)

    # --- calls

    def call(
        self, requests: Sequence[ModelRequest], per_image: PerImage, kwargs: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """The pipeline for this call and its keyword arguments: `kwargs` holds what every
        family takes (prompts, size, steps, guidance, generators, callback, output type)."""
        raise NotImplementedError

    # --- latents

    def unpack_latents(self, pipe: Any, packed: Any, width: int, height: int) -> Any:
        """Packed transformer latents -> (batch, channels, height/8, width/8) VAE latents."""
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)

    def decode(self, pipe: Any, latents: Any) -> Any:
        """VAE latents (unpacked, as the transformer sees them) -> images as tensors in [-1, 1]."""
        config = pipe.vae.config
        latents = latents / config.scaling_factor + config.shift_factor
        return pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]

    def encode(self, pipe: Any, pixels: Any) -> Any:
        """Images in [-1, 1] -> VAE latents as the transformer sees them (preview calibration)."""
        config = pipe.vae.config
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        return (latents - config.shift_factor) * config.scaling_factor

    # --- LoRA

    def lora_state_dict(self, path: str) -> tuple[dict, dict | None]:
        """An adapter file as (state dict in diffusers' layout, alphas) for this family (only
        FLUX.1's loader returns kohya alphas separately)."""
        return self.pipeline_class().lora_state_dict(path), None


def image_to_image_steps(steps: int, strength: float) -> int:
    """The schedule length at which an image-to-image call at `strength` runs exactly `steps`
    denoising steps, so steps, progress and preview steps mean what they mean for text-to-image.
    diffusers runs the last ~`length * strength` steps of a schedule, rounding toward running
    more: at 4 steps and strength 0.8 it would start from pure noise and ignore the image. The
    longest such schedule skips what `strength` asks to skip."""
    length = steps
    while _steps_run(length, strength) < steps:
        length += 1
    while _steps_run(length + 1, strength) == steps:
        length += 1
    return length


def _steps_run(length: int, strength: float) -> int:
    """How many steps diffusers' image-to-image `get_timesteps` keeps of a `length` schedule."""
    start = int(max(length - min(length * strength, length), 0))
    return length - start
