"""Load and run a model family's diffusers pipelines. No HTTP, no Ray.

Written as numbered steps like a diffusers ``__call__``: the engine turns a group of compatible
requests (``contract.ModelRequest``s grouped by ``batching``) into one pipeline call with a
prompt list and one seeded ``torch.Generator`` per image, and returns PIL images per request.
What differs between families (which pipeline, which arguments, which tokenizer) is the
family's runner (``serve_app.families``).
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from PIL import Image

from serve_app.adapters import pipeline_name
from serve_app.batching import group_key
from serve_app.config import ModelConfig
from serve_app.contract import GenerationCancelled, ModelRequest, PreviewImages
from serve_app.engine_adapters import (
    AdapterFamilyError,
    AdapterLoadError,
    linear_shapes,
    read_adapter_file,
)
from serve_app.families import Endpoint, family_runner, traits
from serve_app.geometry import nearest_resolution, parse_wxh
from serve_app.imageops import composite
from serve_app.memory_fit import MemoryFit, fit_memory
from serve_app.previews import decode_preview, fit_latent_rgb
from serve_app.speed import SpeedOptionError, apply_speed_options

logger = logging.getLogger(__name__)

# Called after every denoising step with (step index, total steps, requests of the call, latents).
StepCallback = Callable[[int, int, Sequence[ModelRequest], torch.Tensor], None]

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


class MemoryProbe(Protocol):
    """Measures a device's memory: the peak while `run` runs, and the capacity."""

    def peak_bytes(self, run: Callable[[], object]) -> int: ...

    def capacity_bytes(self) -> int: ...


class CudaMemoryProbe:
    def peak_bytes(self, run: Callable[[], object]) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    def capacity_bytes(self) -> int:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


class ImageEngine:
    """Owns one model's pipelines; not thread-safe, so callers run one call at a time."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        # What differs between families: pipeline classes, call arguments, tokenizer, latents.
        self.family = family_runner(config)
        # The family's main diffusers pipeline (Any: the LoRA, offload and cache methods come
        # from mixins); its variants for edits live on the runner.
        self.pipe: Any = None
        # The transformer's latest prediction, for preview estimates.
        self._velocity: torch.Tensor | None = None
        self._velocity_open = True  # the next transformer output is a step's first
        self._preview_projection: torch.Tensor | None = None  # latent_rgb: (17, 3) latent -> RGB
        # LoRA adapters loaded into the pipeline: replaced (never mutated) by the pipeline
        # thread, so other threads may read it at any time.
        self.adapters: frozenset[str] = frozenset()
        # The prompt-length check runs on Serve's threads, beside pipeline calls. A fast
        # tokenizer keeps truncation and padding as state on its Rust backend, so sharing the
        # pipeline's would let one call tokenize with the other's settings (wrong images):
        # the check has its own copy, and a lock for its own concurrent callers.
        self._counting_tokenizer: Any = None
        self._counting_lock = threading.Lock()
        # "<component>.<module>" -> (out_features, in_features) of every Linear layer, taken at
        # load before any adapter wraps one: adapter files are checked against it off-thread.
        self._linear_shapes: dict[str, tuple[int, int]] = {}
        # Sequence-parallel ranks (`parallel.degree` > 1): the step's stop-or-continue decision
        # every rank must agree on (`sequence_parallel.StepAgreement`), set by whoever joined
        # this process to the replica's process group before `load`.
        self.lockstep: Callable[[bool], bool] | None = None

    def load(self) -> None:
        """1. Check options, 2. load weights with `from_pretrained`, 3. place them, 4. speed-ups."""
        config, speed = self.config, self.config.speed
        if speed.quantization == "fp8" and self.device != "cuda":
            raise ModelLoadError(
                f"model {config.id!r}: speed.quantization 'fp8' needs a CUDA GPU (torchao float8 "
                "kernels); this replica has none. Remove the option or give it a GPU."
            )
        if config.cpu_offload and self.device != "cuda":
            raise ModelLoadError(f"model {config.id!r}: cpu_offload needs a CUDA GPU.")

        if config.cpu_offload and config.source == "synthetic":
            raise ModelLoadError(
                f"model {config.id!r}: cpu_offload is not supported with source 'synthetic' "
                "(its weights are created on the GPU); remove one of the two."
            )
        source = config.source
        if source == "tiny":
            from serve_app.tiny import ensure_tiny_model

            source = str(ensure_tiny_model(config.cache_dir, config.family))
        started = time.perf_counter()
        try:
            if source == "synthetic":
                pipe = self.family.build_synthetic(self.device, self.dtype)
            else:
                pipe = self.family.load(source, self.dtype)
            if config.cpu_offload:
                pipe.enable_model_cpu_offload()
            elif self.device != "cpu" and source != "synthetic":
                pipe.to(self.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise ModelLoadError(
                f"out of GPU memory loading model {config.id!r}: use a GPU with more memory, "
                "set cpu_offload: true, or speed.quantization: fp8."
            ) from exc
        except Exception as exc:  # re-raised with advice
            raise ModelLoadError(
                f"could not load model {config.id!r} from {source!r}: {exc}. Check that the "
                "path exists or, for a hub id, that the weights are downloaded (HF_HOME) or "
                "reachable with access granted (HF_TOKEN)."
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        self._counting_tokenizer = copy.deepcopy(self.family.text_tokenizer(pipe))
        self._linear_shapes = linear_shapes(pipe)
        if config.vae_tiling:
            pipe.vae.enable_tiling()
        if config.vae_slicing:
            pipe.vae.enable_slicing()
        try:
            apply_speed_options(pipe.transformer, speed, self._enable_parallel)
        except (SpeedOptionError, ValueError) as exc:
            raise ModelLoadError(f"model {config.id!r}: {exc}") from exc
        if config.parallel.degree > 1 and speed.first_block_cache_threshold is not None:
            from serve_app.sequence_parallel import agree_on_cache_skips

            agree_on_cache_skips(pipe.transformer)  # else ranks could skip different steps
        pipe.transformer.register_forward_hook(self._remember_velocity)
        self.pipe = pipe
        if config.preview_decoder == "latent_rgb":
            self._preview_projection = fit_latent_rgb(self.family, pipe, self.device)
        # Edits' and masked edits' variants over the same modules, no second copy of the weights.
        self.family.attach(pipe)
        logger.info(
            "Loaded %s from %s on %s (%s) in %.1fs; speed options: %s",
            config.id,
            source,
            self.device,
            self.dtype,
            time.perf_counter() - started,
            speed.model_dump(),
        )

    def _enable_parallel(self, transformer: Any) -> None:
        """Split the sequence across the process group's ranks (`parallel.degree` > 1)."""
        parallel = self.config.parallel
        if parallel.degree == 1:
            return
        from serve_app.sequence_parallel import enable_sequence_parallel

        if self.config.max_sequence_length % parallel.degree:
            raise ValueError(
                f"max_sequence_length {self.config.max_sequence_length} must be a multiple of "
                f"the parallel degree {parallel.degree} (the text tokens are split too)"
            )
        enable_sequence_parallel(transformer, parallel, self.device)

    def check_request(self, request: ModelRequest) -> None:
        """Refuse, before it joins a call, a request this engine cannot run: with sequence
        parallelism on gloo, a sequence that does not split evenly across the ranks."""
        from serve_app.contract import APIError
        from serve_app.sequence_parallel import split_problem

        in_sequence = traits(self.config.family).conditioning == "reference"
        problem = split_problem(request, self.config.parallel, self.device, in_sequence)
        if problem:
            raise APIError(problem[0].upper() + problem[1:] + ".", param="size")

    def _remember_velocity(self, module, args, output) -> None:
        """The step's first transformer output: with true CFG (Qwen-Image) a step runs the
        prompt's pass, then the negative prompt's; previews follow the prompt's."""
        if self._velocity_open:
            self._velocity = output[0] if isinstance(output, tuple) else output.sample
            self._velocity_open = False

    def decode_preview(
        self, packed_latents: torch.Tensor, width: int, height: int
    ) -> list[Image.Image]:
        """Images from packed latents with the configured preview decoder."""
        return decode_preview(
            self.family, self.pipe, packed_latents, width, height, self._preview_projection
        )

    def warmup(self) -> None:
        """One short text-to-image and one edit per warm-up size, so no client pays for first
        calls (allocator growth, kernel selection, compilation)."""
        sizes = self.config.warmup_sizes or [self.config.default_size]
        for size in sizes:
            width, height = parse_wxh(size)
            canvas = Image.new(
                "RGB", nearest_resolution(width, height, self.config.resolution_buckets), "gray"
            )
            started = time.perf_counter()
            family = traits(self.config.family)
            kinds: list[tuple[tuple[Image.Image, ...], Endpoint]] = [
                ((), "generations"),
                ((canvas,), "edits"),
            ]
            for conditioning in [inputs for inputs, kind in kinds if family.serves(kind)]:
                request = ModelRequest(
                    request_id="warmup",
                    prompt="warm-up",
                    width=width,
                    height=height,
                    steps=2,
                    guidance=self.config.default_guidance,
                    seeds=(0,),
                    conditioning=conditioning,
                )
                self.generate([request])
            logger.info(
                "Warmed up %s at %s in %.1fs", self.config.id, size, time.perf_counter() - started
            )

    def measure_memory(self, probe: MemoryProbe) -> tuple[MemoryFit, tuple[int, int]]:
        """Peak memory of edit calls (the larger kind: conditioning doubles the tokens) of one
        and two images at the largest warm-up size, fitted to a line (`memory_fit`)."""
        width, height = self._largest_warmup_size()
        bucket = nearest_resolution(width, height, self.config.resolution_buckets)
        canvas = Image.new("RGB", bucket, "gray")
        peaks = []
        for n in (1, 2):
            request = ModelRequest(
                "memory", "warm-up", width, height, 2, self.config.default_guidance,
                tuple(range(n)), conditioning=(canvas,),
            )  # fmt: skip
            peaks.append(probe.peak_bytes(functools.partial(self.generate, [request])))
        fit = fit_memory(peaks[0], peaks[1], width * height, probe.capacity_bytes())
        logger.info("Memory of %s: %s", self.config.id, fit.describe(width, height))
        return fit, (width, height)

    def planned_memory(
        self, capacity_bytes: int, plan: dict | None = None
    ) -> tuple[MemoryFit | None, tuple[int, int]]:
        """The fit `python -m serve_app.bench plan` predicted for this model (the committed
        `serve_app/data/memory_plan.json` unless `plan` is given) at the largest warm-up size,
        for a 1-image edit (the kind `measure_memory` measures) with these weights and, when
        LoRA is on, a rank-32 adapter. None when the plan is of another architecture or lacks
        the case, or when the config runs what the plan does not model: weights offloaded to
        the CPU, a 4-byte dtype, a sliced or tiled VAE, a sequence split across GPUs (then the
        replica measures)."""
        from serve_app import memory_plan

        width, height = self._largest_warmup_size()
        config = self.config
        if (
            config.cpu_offload
            or config.parallel.degree > 1  # the plan is of one GPU holding the whole sequence
            or config.vae_slicing
            or config.vae_tiling
            or self.dtype not in (torch.bfloat16, torch.float16)
        ):
            return None, (width, height)
        if plan is None:
            path = memory_plan.committed_plan(config.family)
            if not path.exists():
                return None, (width, height)
            plan = memory_plan.load_plan(path)
        transformer = dict(self.pipe.transformer.config)
        planned = plan.get("architecture", {})
        if (
            plan.get("family", "flux-kontext") != config.family
            or not planned
            or any(transformer.get(key) != value for key, value in planned.items())
        ):
            return None, (width, height)
        weights = "fp8" if self.config.speed.quantization == "fp8" else "bf16"
        lora_rank = memory_plan.LORA_RANK if self.config.lora.enabled else 0
        # The larger kind of call the family runs: an edit, where the plan has one.
        task = "edits-1" if any(r["task"] == "edits-1" for r in plan["rows"]) else "generations"
        fit = memory_plan.planned_fit(plan, task, width, height, weights, lora_rank, capacity_bytes)
        if fit is not None:
            logger.info(
                "Planned memory of %s (%s, LoRA rank %d): %s",
                self.config.id, weights, lora_rank, fit.describe(width, height),
            )  # fmt: skip
        return fit, (width, height)

    def _largest_warmup_size(self) -> tuple[int, int]:
        sizes = [parse_wxh(size) for size in self.config.warmup_sizes or [self.config.default_size]]
        return max(sizes, key=lambda size: size[0] * size[1])

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def check_health(self) -> None:
        """Raises when the engine cannot serve; one process on one device always can once
        loaded (a sequence-parallel engine also checks its peers)."""

    # --- LoRA adapters. `read_adapter` is thread-safe (runs beside a pipeline call); the rest
    # --- change the pipeline's modules, so they run on the pipeline's thread, between calls.

    def read_adapter(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """An adapter file as a state dict in diffusers' layout, checked against this model's
        layers (so a mismatch is refused before anything is injected; `engine_adapters`)."""
        try:
            return read_adapter_file(
                name, path, self._linear_shapes, self.config.id, self.family.lora_state_dict
            )
        except AdapterLoadError as exc:
            if "NaN" in str(exc):
                raise
            title = traits(self.config.family).title
            kind = AdapterFamilyError if isinstance(exc, AdapterFamilyError) else AdapterLoadError
            raise kind(
                f"{exc}. Model {self.config.id!r} is {title}: an adapter must be trained for "
                "that family (one for another family names layers it does not have)"
            ) from None

    def add_adapter(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Inject a read adapter (inactive until a call asks for it)."""
        try:
            self.pipe.load_lora_weights(dict(state), adapter_name=pipeline_name(name))
        except Exception as exc:  # noqa: BLE001 - diffusers removes a half-injected adapter
            raise AdapterLoadError(f"adapter {name!r} could not be loaded: {exc}") from None
        self.adapters = self.adapters | {name}

    def remove_adapters(self, names: Sequence[str]) -> None:
        loaded = [name for name in names if name in self.adapters]
        if loaded:
            self.pipe.delete_adapters([pipeline_name(name) for name in loaded])
            self.adapters = self.adapters - set(loaded)
        if loaded and not self.adapters:
            self.pipe.unload_lora_weights()  # the original layers back, no PEFT wrappers left

    def _activate_adapters(self, request: ModelRequest) -> None:
        """The call's adapters at its scales, or the base weights exactly (PEFT layers disabled
        run only the original layer)."""
        missing = [a.name for a in request.adapters if a.name not in self.adapters]
        if missing:  # never run an adapter request on other weights
            raise RuntimeError(f"adapters {missing} are not loaded on this replica")
        if not self.adapters:
            return
        if not request.adapters:
            self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        names = [pipeline_name(a.name) for a in request.adapters]
        self.pipe.set_adapters(names, [a.scale for a in request.adapters])

    def count_text_tokens(self, prompt: str) -> int:
        """Tokens the family's text encoder would see for `prompt` (T5: end-of-sequence
        included; Qwen: its prompt template too). Safe from any thread: never touches the
        pipeline's own tokenizer."""
        with self._counting_lock:
            return self.family.count_tokens(self._counting_tokenizer, prompt)

    def generate(
        self,
        requests: Sequence[ModelRequest],
        step_callback: StepCallback | None = None,
        decode: bool = True,
    ) -> list[list[Image.Image]]:
        """Run compatible requests as one pipeline call; each request's images in seed order.
        `decode=False` (a sequence-parallel peer rank: rank 0 decodes) stops after the last
        denoising step and returns no images."""
        # 1. Check the requests really share one call.
        first = requests[0]
        keys = {group_key(request) for request in requests}
        if len(keys) != 1:
            raise ValueError(f"requests in one pipeline call must share a group key, got {keys}")

        # 2. The call's LoRA adapters (or none); one prompt and one generator per image, CPU
        #    generators so seeds give the same image on any device.
        self._activate_adapters(first)
        prompts = [request.prompt for request in requests for _ in request.seeds]
        generators = [
            torch.Generator("cpu").manual_seed(seed)
            for request in requests
            for seed in request.seeds
        ]

        # 3. Per-step hook: stop when every request is gone, send previews, report progress.
        offsets = [sum(request.n for request in requests[:i]) for i in range(len(requests))]

        # With sequence-parallel ranks, this rank's previews and progress run first, then the
        # ranks agree whether to go on: a stop (every request gone, or a failure here) then
        # happens at the same step everywhere, and no rank is left waiting in a collective.
        def callback(pipe, step, timestep, tensors):
            self._velocity_open = True  # after this step's previews: the next step's first
            stop = all(request.cancelled for request in requests)
            failure: BaseException | None = None
            if not stop:
                try:
                    report(pipe, step, tensors["latents"])
                except Exception as exc:  # noqa: BLE001 - re-raised once the ranks agree
                    failure, stop = exc, True
            if self.lockstep is not None:
                stop = self.lockstep(stop)
            if failure is not None:
                raise failure
            if stop:
                raise GenerationCancelled(f"all {len(requests)} requests cancelled at step {step}")
            return {}

        def report(pipe, step, latents):
            previews = [
                (offset, request, request.events)
                for offset, request in zip(offsets, requests, strict=True)
                if request.events is not None
                and step in request.preview_steps
                and not request.cancelled
            ]
            if previews:
                # Flow matching: x_next = x + (sigma_next - sigma) * v, so the current estimate
                # of the final latents is x_next - sigma_next * v. The scheduler's step index
                # is past this step (image-to-image calls start part-way down the schedule).
                sigmas, index = pipe.scheduler.sigmas, pipe.scheduler.step_index
                sigma_next = sigmas[index].to(latents.device, latents.dtype)
                assert self._velocity is not None  # the forward hook set it this step
                velocity = self._velocity[:, : latents.shape[1]].to(latents.dtype)
                for offset, request, events in previews:
                    rows = slice(offset, offset + request.n)
                    denoised = latents[rows] - sigma_next * velocity[rows]
                    events(
                        PreviewImages(
                            partial_index=request.preview_steps.index(step),
                            step=step,
                            first_image_index=request.first_image_index,
                            images=self.decode_preview(denoised, first.width, first.height),
                        )
                    )
            if step_callback is not None:
                step_callback(step, first.steps, requests, latents)

        # 4. Inputs per image: text only, a conditioning canvas, or canvas + image + mask; the
        #    family picks the pipeline and adds its own arguments. Conditioning arrives at its
        #    final size, so the pipelines must not resize it again.
        def per_image(values):
            return [
                value
                for request, value in zip(requests, values, strict=True)
                for _ in request.seeds
            ]

        pipe, kwargs = self.family.call(
            requests,
            per_image,
            dict(
                prompt=prompts,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=generators,
                max_sequence_length=self.config.max_sequence_length,
                callback_on_step_end=callback,
                output_type="pil" if decode else "latent",
            ),
        )

        # 5. Denoise and decode. The cache context is what diffusers' step caches key their state
        #    on (FLUX.1 has no unconditional pass, so one "cond" context covers the call).
        self._velocity_open = True
        try:
            with torch.inference_mode(), pipe.transformer.cache_context("cond"):
                images = pipe(**kwargs).images
        except BaseException:
            pipe.maybe_free_model_hooks()  # reset step caches left mid-call
            raise

        # 6. Hand each request its own images; masked edits get their unmasked pixels back exactly.
        if not decode:
            return [[] for _ in requests]
        results, start = [], 0
        for request in requests:
            own = images[start : start + request.n]
            if request.masked:
                own = [composite(image, request.init_image, request.mask) for image in own]
            results.append(own)
            start += request.n
        return results
