"""Load and run the FLUX Kontext pipeline. No HTTP, no Ray.

Written as numbered steps like a diffusers ``__call__``: the engine turns a group of compatible
jobs (see ``serve_app.batching``) into one pipeline call with a prompt list and one seeded
``torch.Generator`` per image, and returns PIL images per job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from serve_app.batching import GenerationCancelled, ImageJob, PartialImages
from serve_app.config import ModelConfig
from serve_app.imageops import composite

logger = logging.getLogger(__name__)

# Called after every denoising step with (step index, total steps, jobs of the call, latents).
StepCallback = Callable[[int, int, Sequence[ImageJob], torch.Tensor], None]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do about it."""


def resolve_device(config: ModelConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model {config.id!r} asks for device 'cuda' but no CUDA GPU is visible to this "
            "replica; give the deployment a GPU (ray_actor_options.num_gpus) or set device: auto."
        )
    return config.device


def resolve_dtype(config: ModelConfig, device: str) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return _DTYPES[config.dtype]


class FluxEngine:
    """Owns one FluxKontextPipeline; not thread-safe, so callers run one call at a time."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        self.pipe = None
        self.inpaint_pipe = None
        self._velocity = None  # the transformer's latest prediction, for preview estimates
        self._preview_projection = None  # (17, 3) latent -> RGB, fitted on this model's VAE

    def load(self) -> None:
        """1. Check options, 2. load weights with `from_pretrained`, 3. place them, 4. speed-ups."""
        from diffusers import FluxKontextInpaintPipeline, FluxKontextPipeline

        config, speed = self.config, self.config.speed
        if speed.quantization == "fp8" and self.device != "cuda":
            raise ModelLoadError(
                f"model {config.id!r}: speed.quantization 'fp8' needs a CUDA GPU (torchao float8 "
                "kernels); this replica has none. Remove the option or give it a GPU."
            )
        if config.cpu_offload and self.device != "cuda":
            raise ModelLoadError(f"model {config.id!r}: cpu_offload needs a CUDA GPU.")

        source = config.source
        if source == "tiny":
            from serve_app.tiny import ensure_tiny_model

            source = str(ensure_tiny_model(config.cache_dir))
        started = time.perf_counter()
        try:
            pipe = FluxKontextPipeline.from_pretrained(source, dtype=self.dtype)
            if config.cpu_offload:
                pipe.enable_model_cpu_offload()
            elif self.device != "cpu":
                pipe.to(self.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(
                f"out of GPU memory loading model {config.id!r}: use a GPU with more memory, "
                "set cpu_offload: true, or speed.quantization: fp8."
            ) from exc
        except Exception as exc:  # noqa: BLE001 - re-raised with advice
            raise ModelLoadError(
                f"could not load model {config.id!r} from {source!r}: {exc}. Check that the "
                "path exists or, for a hub id, that the weights are downloaded (HF_HOME) or "
                "reachable with access granted (HF_TOKEN)."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        if config.vae_tiling:
            pipe.vae.enable_tiling()
        if config.vae_slicing:
            pipe.vae.enable_slicing()
        self._apply_speed_options(pipe.transformer)
        pipe.transformer.register_forward_hook(self._remember_velocity)
        self.pipe = pipe
        self._preview_projection = self._fit_preview_projection()
        # Masked edits: the inpaint variant over the same modules, no second copy of the weights.
        self.inpaint_pipe = FluxKontextInpaintPipeline.from_pipe(pipe)
        self.inpaint_pipe.set_progress_bar_config(disable=True)
        logger.info(
            "Loaded %s from %s on %s (%s) in %.1fs; speed options: %s",
            config.id,
            source,
            self.device,
            self.dtype,
            time.perf_counter() - started,
            speed.model_dump(),
        )

    def _remember_velocity(self, module, args, output) -> None:
        self._velocity = output[0] if isinstance(output, tuple) else output.sample

    @torch.inference_mode()
    def _fit_preview_projection(self) -> torch.Tensor:
        """Least-squares linear map from this model's latents to RGB, for cheap previews.

        Encodes a calibration image of random colour blocks with the model's own VAE and fits
        RGB (at latent resolution) ~ [latent, 1] @ W, so it works for any VAE, the tiny one too.
        """
        import numpy as np

        pipe, cell = self.pipe, self.pipe.vae_scale_factor
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
        pixels = torch.from_numpy(blocks.repeat(cell, 0).repeat(cell, 1)).float() / 127.5 - 1
        image = pixels.permute(2, 0, 1)[None].to(self.device, pipe.vae.dtype)
        latents = pipe.vae.encode(image).latent_dist.mode()
        latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        features = latents[0].permute(1, 2, 0).reshape(-1, latents.shape[1]).float().cpu()
        features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        target = torch.from_numpy(blocks.reshape(-1, 3)).float() / 127.5 - 1
        return torch.linalg.lstsq(features, target).solution

    @torch.inference_mode()
    def decode_preview(
        self, packed_latents: torch.Tensor, width: int, height: int
    ) -> list[Image.Image]:
        """Images from packed latents with the configured preview decoder."""
        pipe = self.pipe
        latents = pipe._unpack_latents(packed_latents, height, width, pipe.vae_scale_factor)
        if self.config.preview_decoder == "vae":
            latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
            return pipe.image_processor.postprocess(decoded, output_type="pil")
        projection = self._preview_projection
        rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), projection[:-1]) + projection[-1]
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        return [Image.fromarray(p).resize((width, height), Image.BILINEAR) for p in pixels]

    def _apply_speed_options(self, transformer) -> None:
        speed = self.config.speed
        if speed.attention_backend:
            try:
                transformer.set_attention_backend(speed.attention_backend)
            except Exception as exc:  # noqa: BLE001 - re-raised with advice
                raise ModelLoadError(
                    f"model {self.config.id!r}: attention backend "
                    f"{speed.attention_backend!r} is not usable here: {exc}"
                ) from exc
        if speed.quantization == "fp8":
            try:
                from torchao.quantization import (
                    Float8DynamicActivationFloat8WeightConfig,
                    quantize_,
                )
            except ImportError as exc:
                raise ModelLoadError(
                    "speed.quantization 'fp8' needs torchao: pip install torchao"
                ) from exc
            quantize_(transformer, Float8DynamicActivationFloat8WeightConfig())
        if speed.first_block_cache_threshold is not None:
            from diffusers import FirstBlockCacheConfig

            transformer.enable_cache(
                FirstBlockCacheConfig(threshold=speed.first_block_cache_threshold)
            )
        if speed.compile:
            transformer.compile_repeated_blocks(fullgraph=True)

    def warmup(self) -> None:
        """One short text-to-image and one edit per warm-up size, so no client pays for first
        calls (allocator growth, kernel selection, compilation)."""
        from PIL import Image

        from serve_app.imageops import nearest_resolution, parse_resolution

        sizes = self.config.warmup_sizes or [self.config.default_size]
        for size in sizes:
            width, height = parse_resolution(size)
            canvas = Image.new(
                "RGB", nearest_resolution(width, height, self.config.resolution_buckets), "gray"
            )
            started = time.perf_counter()
            for conditioning in ((), (canvas,)):
                job = ImageJob(
                    request_id="warmup",
                    prompt="warm-up",
                    width=width,
                    height=height,
                    steps=2,
                    guidance=self.config.default_guidance,
                    seeds=(0,),
                    conditioning=conditioning,
                )
                self.generate([job])
            logger.info(
                "Warmed up %s at %s in %.1fs", self.config.id, size, time.perf_counter() - started
            )

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def count_text_tokens(self, prompt: str) -> int:
        """Tokens the T5 text encoder would see for `prompt`, end-of-sequence included."""
        return len(self.pipe.tokenizer_2(prompt, truncation=False).input_ids)

    def generate(
        self, jobs: Sequence[ImageJob], step_callback: StepCallback | None = None
    ) -> list[list[Image.Image]]:
        """Run compatible jobs as one pipeline call; returns each job's images in seed order."""
        # 1. Check the jobs really share one call.
        first = jobs[0]
        keys = {job.group_key() for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"jobs in one pipeline call must share a group key, got {keys}")

        # 2. One prompt and one generator per image; CPU generators make seeds device-independent.
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        generators = [
            torch.Generator("cpu").manual_seed(seed) for job in jobs for seed in job.seeds
        ]

        # 3. Per-step hook: stop when every request is gone, send previews, report progress.
        offsets = [sum(job.n for job in jobs[:i]) for i in range(len(jobs))]

        def callback(pipe, step, timestep, tensors):
            if all(job.cancelled for job in jobs):
                raise GenerationCancelled(f"all {len(jobs)} requests cancelled at step {step}")
            latents = tensors["latents"]
            previews = [
                (offset, job)
                for offset, job in zip(offsets, jobs, strict=True)
                if job.events is not None and step in job.preview_steps and not job.cancelled
            ]
            if previews:
                # Flow matching: x_next = x + (sigma_next - sigma) * v, so the current estimate
                # of the final latents is x_next - sigma_next * v.
                sigma_next = pipe.scheduler.sigmas[step + 1].to(latents.device, latents.dtype)
                velocity = self._velocity[:, : latents.shape[1]].to(latents.dtype)
                for offset, job in previews:
                    rows = slice(offset, offset + job.n)
                    denoised = latents[rows] - sigma_next * velocity[rows]
                    job.events(
                        PartialImages(
                            partial_index=job.preview_steps.index(step),
                            step=step,
                            first_image_index=job.first_image_index,
                            images=self.decode_preview(denoised, first.width, first.height),
                        )
                    )
            if step_callback is not None:
                step_callback(step, first.steps, jobs, latents)
            return {}

        # 4. Inputs per image: text only, a conditioning canvas, or canvas + image + mask.
        #    Conditioning arrives at its final size, so the pipelines must not resize it again.
        def per_image(values):
            return [value for job, value in zip(jobs, values, strict=True) for _ in job.seeds]

        kwargs = dict(
            prompt=prompts,
            width=first.width,
            height=first.height,
            max_area=first.width * first.height,  # stop Kontext rescaling to its 1 MP default
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=generators,
            max_sequence_length=self.config.max_sequence_length,
            callback_on_step_end=callback,
            output_type="pil",
        )
        pipe = self.pipe
        if first.mask is not None:
            pipe = self.inpaint_pipe
            kwargs.update(
                image=per_image(job.init_image for job in jobs),
                mask_image=per_image(job.mask for job in jobs),
                image_reference=per_image(job.conditioning[0] for job in jobs),
                strength=1.0,
                _auto_resize=False,
            )
        elif first.conditioning:
            kwargs.update(image=per_image(job.conditioning[0] for job in jobs), _auto_resize=False)

        # 5. Denoise and decode. The cache context is what diffusers' step caches key their state
        #    on (Kontext has no unconditional pass, so one "cond" context covers the call).
        try:
            with torch.inference_mode(), pipe.transformer.cache_context("cond"):
                images = pipe(**kwargs).images
        except BaseException:
            pipe.maybe_free_model_hooks()  # reset step caches left mid-call
            raise

        # 6. Hand each job its own images; masked edits get their unmasked pixels back exactly.
        results, start = [], 0
        for job in jobs:
            own = images[start : start + job.n]
            if job.mask is not None:
                own = [composite(image, job.init_image, job.mask) for image in own]
            results.append(own)
            start += job.n
        return results
