"""Device memory of a FLUX.1-Kontext-dev pipeline call, planned on a CPU with fake tensors.

`serve_app.memory_fit` fits peak memory from two calls measured on the GPU at warm-up. This
module plans the same numbers before any GPU is lent: the real architecture
(`serve_app.synthetic`) is built under `FakeTensorMode` (shapes, dtypes and storages, no data:
24 GB of weights cost nothing), and the engine's call is walked phase by phase as
`FluxKontextPipeline` runs it: text encoders (CLIP pooled, T5 at 512 tokens), for edits the VAE
encode of the conditioning canvas (one image at a time, as the pipeline does with a generator
per image), two denoising steps, the VAE decode. A dispatch mode counts the bytes of every live
storage, so the peak is resident weights + the most that is live at any moment.

One step stands for 28: every step has the same shapes, and from step 2 on the same tensors are
live across steps (latents, prompt embeddings, conditioning latents and the previous step's
velocity, which the engine's preview hook keeps), so one step walked with a previous velocity
already live has the peak of all 28. FLOPs per image count the step 28 times.

`fp8` is emulated: torchao does not run on fake tensors (nor is it installed on CPUs), so every
`nn.Linear` of the transformer becomes `Float8LinearStandIn`, holding what torchao's
`Float8DynamicActivationFloat8WeightConfig` (per-tensor scales) holds: 1-byte weights, a float32
scale, the bias; its forward makes the transient fp8 copy of the input and a bf16 output.

The reader (`load_plan`, `planned_fit`) is pure Python: it turns a plan's rows into the
`MemoryFit` a replica would otherwise measure.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from serve_app.geometry import PATCH, format_wxh
from serve_app.memory_fit import HEADROOM, MemoryFit

MODEL = "FLUX.1-Kontext-dev"
STEPS = 28  # the production step count (quality "high" and the model card's default)
TEXT_TOKENS = 512  # T5 max_sequence_length
CLIP_TOKENS = 77
# Conditioning images per task: an edit's canvas adds its image tokens to the sequence.
TASKS = {"generations": 0, "edits-1": 1, "edits-2": 2}
LORA_TARGETS = r".*\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj)"
# torch.cuda.get_device_properties(0).total_memory as commonly reported: H100 SXM 80 GB and
# H200 141 GB (the latter is 140.4 GiB).
GPUS = {"H100-80GB": 85_520_809_984, "H200-141GB": 150_754_820_096}
# `python -m serve_app.bench plan` for FLUX.1-Kontext-dev, committed: replicas start from it.
COMMITTED_PLAN = Path(__file__).parent / "data" / "memory_plan.json"


def committed_plan(family: str = "flux-kontext") -> Path:
    """The committed plan replicas of `family` start from (`bench plan --family F --commit`)."""
    if family == "flux-kontext":
        return COMMITTED_PLAN
    return COMMITTED_PLAN.with_name(f"memory_plan-{family}.json")


LORA_RANK = 32  # the planned adapter: typical of published FLUX LoRAs, every attention projection
# Convolutions' scratch buffers, which fake tensors never allocate: on the tiny model the real
# peak of a VAE-bound call is 15-17% above the fake one (tests/unit/test_memory_plan.py). The
# line replicas use raises the per-image part by this much; the plan's rows stay as walked.
CONVOLUTION_SCRATCH = 1.2
COMPONENT_NAMES = ("transformer", "text_encoder", "text_encoder_2", "vae")
ARCHITECTURE_FIELDS = (
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "in_channels",
)


# --- Counting live storages -------------------------------------------------------------------


class LiveBytes:
    """Bytes of the storages created since `start()` that are still alive, and their peak per
    phase. Fed by a dispatch mode (`tracking`), freed by weakref finalizers on the storages, so
    a storage counts exactly as long as some tensor or view holds it."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self.phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, storage: Any) -> None:
        if storage in self._seen:
            return
        nbytes = int(storage.nbytes())
        self._seen.add(storage)
        weakref.finalize(storage, self._free, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.live)

    def ignore(self, storages: list[Any]) -> None:
        """Storages that exist already (the weights): views of them are not new memory."""
        for storage in storages:
            self._seen.add(storage)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def enter(self, phase: str) -> None:
        """Start a phase: its peak starts at what is live now (carried from earlier phases)."""
        self.phase = phase
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.live)


@contextmanager
def tracking(live: LiveBytes) -> Iterator[LiveBytes]:
    """Count every tensor that an op creates while the block runs (views add nothing)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    live.add(leaf.untyped_storage())
            return out

    with _Mode():
        yield live


def weight_storages(modules: list[Any]) -> list[Any]:
    """The distinct storages behind the modules' parameters and buffers."""
    seen: dict[int, Any] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[id(storage)] = storage
    return list(seen.values())


def storage_bytes(modules: list[Any]) -> int:
    """Resident bytes of the modules' weights (shared storages once)."""
    return sum(int(storage.nbytes()) for storage in weight_storages(modules))


# --- Building the model ----------------------------------------------------------------------


def float8_stand_in_class() -> type:
    """`Float8LinearStandIn`: an `nn.Linear` (so PEFT wraps it as it wraps torchao's) holding a
    float8 weight and a per-tensor float32 scale; forward quantises its input (the transient
    fp8 copy plus its scale) and returns a bf16 output, as torchao's `_scaled_mm` path does."""
    import torch
    from torch import nn

    class Float8LinearStandIn(nn.Linear):
        def __init__(self, linear: nn.Linear) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = linear.in_features, linear.out_features
            weight = torch.empty_like(linear.weight, dtype=torch.float8_e4m3fn)
            self.weight = nn.Parameter(weight, requires_grad=False)
            self.register_buffer("weight_scale", torch.empty((), dtype=torch.float32))
            self.bias = linear.bias
            self.output_dtype = linear.weight.dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x_fp8 = x.to(torch.float8_e4m3fn)  # noqa: F841 - transient copy, freed on return
            x_scale = torch.empty((), dtype=torch.float32, device=x.device)  # noqa: F841
            # bias and both scales are fused into the scaled matmul: one bf16 output.
            return x.new_empty((*x.shape[:-1], self.out_features), dtype=self.output_dtype)

    return Float8LinearStandIn


def to_float8(transformer: Any) -> int:
    """Swap every `nn.Linear` of the transformer (PEFT's base layers included, its adapters
    not) for the float8 stand-in; returns how many were swapped."""
    from torch import nn

    stand_in = float8_stand_in_class()
    swapped = 0
    for name, module in list(transformer.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and ".lora_" not in f".{full}":
                setattr(module, child_name, stand_in(child))
                swapped += 1
    return swapped


def add_lora(transformer: Any, rank: int) -> None:
    """Rank-`rank` LoRA on every attention projection (`serve_app.lora_synthetic`'s targets),
    injected by PEFT as diffusers' `load_lora_weights` does, in the base layers' dtype."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS)
    # PEFT moves new adapters to the base layer's device and dtype with Module.to, which cannot
    # swap fake parameters: create them in that dtype (all is on the CPU) and make `to` a no-op.
    move, to = BaseTunerLayer._move_adapter_to_device_of_base_layer, torch.nn.Module.to
    default = torch.get_default_dtype()
    torch.set_default_dtype(next(transformer.parameters()).dtype)
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *a, **k: None  # type: ignore[method-assign]
    torch.nn.Module.to = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        inject_adapter_in_model(config, transformer, adapter_name="plan")
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move  # type: ignore[method-assign]
        torch.nn.Module.to = to  # type: ignore[method-assign]
        torch.set_default_dtype(default)


def component_configs(source: str) -> dict[str, dict[str, Any]]:
    """The four components' configs: FLUX.1-Kontext-dev's (`synthetic`), the tiny model's
    (`tiny`, read from its saved directory) or those of any diffusers directory."""
    from serve_app import synthetic

    if source == "synthetic":
        return {name: dict(config) for name, config in synthetic.COMPONENTS.items()}
    if source == "tiny":
        from serve_app.tiny import ensure_tiny_model

        source = str(ensure_tiny_model())
    configs = {}
    for name in COMPONENT_NAMES:
        with open(Path(source) / name / "config.json") as file:
            configs[name] = {k: v for k, v in json.load(file).items() if not k.startswith("_")}
    return configs


def build_model(
    configs: dict[str, dict[str, Any]], dtype: Any, weights: str = "bf16", lora_rank: int = 0
) -> dict[str, Any]:
    """The components from `configs` in `dtype` on the CPU, under whatever tensor mode is
    active (fake: nothing allocated), with LoRA and the float8 stand-in applied."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def drop(config: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in keys}

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        clip_fields = drop(configs["text_encoder"], "architectures", "torch_dtype", "dtype")
        t5_fields = drop(configs["text_encoder_2"], "architectures", "torch_dtype", "dtype")
        components = {
            "transformer": FluxTransformer2DModel.from_config(configs["transformer"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**clip_fields)),
            "text_encoder_2": T5EncoderModel(T5Config(**t5_fields)),
            "vae": AutoencoderKL.from_config(configs["vae"]),
        }
    finally:
        torch.set_default_dtype(default)
    for module in components.values():
        module.eval().requires_grad_(False)
    if lora_rank:
        add_lora(components["transformer"], lora_rank)
    if weights == "fp8":
        to_float8(components["transformer"])
    elif weights != "bf16":
        raise ValueError(f"weights must be bf16 or fp8, got {weights!r}")
    return components


# --- The call, phase by phase ----------------------------------------------------------------


def walk_call(
    components: dict[str, Any],
    live: LiveBytes,
    *,
    width: int,
    height: int,
    batch: int,
    conditioning_images: int = 0,
    flops: dict[str, int] | None = None,
) -> None:
    """One engine call as `FluxKontextPipeline.__call__` runs it, with `live` told each phase.
    What the pipeline keeps in locals across phases is kept here too. An edit's canvas is
    `conditioning_images` images of the output's aspect side by side, at their nearest Kontext
    bucket (`canvas_size`). One denoising step is walked with the previous step's output already
    live (the engine's preview hook keeps it): that is every step from the second on, and all
    28 have the same shapes. `flops`, if given, gets the FLOPs of the step (`step`) and of the
    rest of the call (`other`)."""
    import torch
    from diffusers import FluxKontextPipeline as Pipe

    clip, t5 = components["text_encoder"], components["text_encoder_2"]
    transformer, vae = components["transformer"], components["vae"]
    dtype = t5.dtype  # the pipeline runs in the text embeddings' dtype
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = transformer.config.in_channels // 4
    lat_h, lat_w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    call = cast(Callable[..., Any], transformer)
    counted = flops is not None
    other, step = _counter(counted), _counter(counted)

    with torch.no_grad():
        live.enter("text_encoders")
        with other:
            clip_ids = torch.zeros(batch, CLIP_TOKENS, dtype=torch.long)
            pooled = clip(clip_ids, output_hidden_states=False).pooler_output.to(dtype)
            del clip_ids
            t5_ids = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long)
            prompt_embeds = t5(t5_ids, output_hidden_states=False)[0].to(dtype)
            del t5_ids
            text_ids = torch.zeros(TEXT_TOKENS, 3, dtype=dtype)

        image_latents = image_ids = None
        if conditioning_images:
            live.enter("vae_encode")
            with other:
                canvas_w, canvas_h = canvas_size(width, height, conditioning_images) or (0, 0)
                image = torch.zeros(batch, 3, canvas_h, canvas_w, dtype=dtype)  # image.to(device)
                # a generator per image: the pipeline encodes one image at a time
                encoded = [vae.encode(image[i : i + 1]).latent_dist.mode() for i in range(batch)]
                del image
                cat = torch.cat(encoded, dim=0)
                del encoded
                cat = (cat - vae.config.shift_factor) * vae.config.scaling_factor
                cat_h, cat_w = cat.shape[2:]
                image_latents = Pipe._pack_latents(cat, batch, channels, cat_h, cat_w)
                del cat
                image_ids = Pipe._prepare_latent_image_ids(
                    batch, cat_h // 2, cat_w // 2, "cpu", dtype
                )
                image_ids[..., 0] = 1

        live.enter("denoise")
        latent_ids = Pipe._prepare_latent_image_ids(batch, lat_h // 2, lat_w // 2, "cpu", dtype)
        noise = torch.randn(batch, channels, lat_h, lat_w, dtype=dtype)
        latents = Pipe._pack_latents(noise, batch, channels, lat_h, lat_w)
        del noise
        if image_ids is not None:
            latent_ids = torch.cat([latent_ids, image_ids], dim=0)
        guidance = torch.full([1], 2.5, dtype=torch.float32).expand(batch)
        tokens = latent_ids.shape[0]
        # the previous step's transformer output, held by the engine's preview hook
        velocity = torch.empty(batch, tokens, transformer.config.in_channels, dtype=dtype)
        model_input = latents
        if image_latents is not None:
            model_input = torch.cat([latents, image_latents], dim=1)
        timestep = torch.full([batch], 0.5, dtype=dtype)
        with step:
            velocity = call(
                hidden_states=model_input,
                timestep=timestep,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=latent_ids,
                return_dict=False,
            )[0]
        del model_input, timestep
        noise_pred = velocity[:, : latents.size(1)]
        # FlowMatchEulerDiscreteScheduler.step: in float32, back to the latents' dtype.
        latents = (latents.to(torch.float32) + (-1.0 / STEPS) * noise_pred).to(dtype)
        del noise_pred, velocity

        live.enter("vae_decode")
        with other:
            latents = Pipe._unpack_latents(latents, height, width, scale)
            latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
            decoded = vae.decode(latents, return_dict=False)[0]
            # image_processor.postprocess's denormalize runs on the device, then .cpu()
            images = (decoded / 2 + 0.5).clamp(0, 1)
            del decoded, images
        live.enter("done")
        del prompt_embeds, pooled, text_ids, image_latents, latents, latent_ids
    if flops is not None:
        flops["step"] = step.total()
        flops["other"] = other.total()


class _FlopTally:
    """A re-enterable FLOP counter (FlopCounterMode, with the CPU flash-attention kernel that
    fake tensors dispatch to counted like any SDPA), or a no-op."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.flops = 0
        self._mode: Any = None

    def __enter__(self) -> _FlopTally:
        if self.enabled:
            import torch
            from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

            def cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
                return sdpa_flop_count(query, key, value)

            op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            self._mode = FlopCounterMode(display=False, custom_mapping={op: cpu_flash})
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self.flops += int(self._mode.get_total_flops())
            self._mode = None

    def total(self) -> int:
        return self.flops


def _counter(enabled: bool) -> _FlopTally:
    return _FlopTally(enabled)


def measure_call(
    components: dict[str, Any],
    *,
    width: int,
    height: int,
    batch: int,
    conditioning_images: int = 0,
    count_flops: bool = False,
    walk: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """The phase peaks of one call (bytes live above the resident weights) and, if asked, its
    FLOPs per image for `STEPS` steps, under whatever tensor mode is active (fake or real).
    `walk` is the family's walk of a call (default: FLUX.1's, `walk_call`)."""
    live = LiveBytes()
    live.ignore(weight_storages(list(components.values())))
    flops: dict[str, int] | None = {} if count_flops else None
    with tracking(live):
        (walk or walk_call)(
            components,
            live,
            width=width,
            height=height,
            batch=batch,
            conditioning_images=conditioning_images,
            flops=flops,
        )
    phases = {k: v for k, v in live.phase_peaks.items() if k not in ("setup", "done")}
    result: dict[str, Any] = {"peak_live_bytes": live.peak, "phases": phases}
    if flops is not None:
        result["flops_step"] = flops["step"] // batch
        result["flops_other"] = flops["other"] // batch
        result["flops_per_image"] = (flops["other"] + STEPS * flops["step"]) // batch
    return result


@contextmanager
def fake_mode() -> Iterator[Any]:
    """`FakeTensorMode` for building and walking the model: no data, real shapes and storages."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def architecture(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The transformer config fields a consumer checks before trusting a plan."""
    return {field: configs["transformer"][field] for field in ARCHITECTURE_FIELDS}


# --- Reading a plan ---------------------------------------------------------------------------


def load_plan(path: str | Path) -> dict[str, Any]:
    """A plan written by `python -m serve_app.bench plan` (`plan.json`)."""
    with open(path) as file:
        return cast(dict[str, Any], json.load(file))


def planned_fit(
    plan: dict[str, Any],
    task: str,
    width: int,
    height: int,
    weights: str,
    lora_rank: int,
    capacity_bytes: int,
    scratch: float | None = None,
) -> MemoryFit | None:
    """The `MemoryFit` (peak = base + bytes per pixel x pixels in the call) of one planned case,
    by least squares over its batch rows, the per-pixel part raised by `scratch` (default
    `CONVOLUTION_SCRATCH`) for what fake tensors never allocate; None when the plan lacks the
    case (no nearest-size guess: a replica then measures, or uses its configured cap)."""
    size = format_wxh(width, height)
    points = [
        (row["batch"] * width * height, row["peak_bytes"])
        for row in plan.get("rows", [])
        if row["task"] == task
        and row["size"] == size
        and row["weights"] == weights
        and row["lora_rank"] == lora_rank
    ]
    if not points:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    if not var:  # one batch only: all of it per pixel is the cautious reading
        slope, mean_x, mean_y = mean_y / mean_x, 0.0, 0.0
    base = mean_y - slope * mean_x
    slope *= CONVOLUTION_SCRATCH if scratch is None else scratch
    return MemoryFit(
        base_bytes=max(int(math.ceil(base)), 0),
        bytes_per_pixel=max(slope, 1e-9),
        capacity_bytes=capacity_bytes,
        headroom=float(plan.get("headroom", HEADROOM)),
    )


def canvas_size(width: int, height: int, conditioning_images: int) -> tuple[int, int] | None:
    """The conditioning canvas of an edit whose input images have the output's aspect: as
    `imageops.prepare_conditioning` builds it, the images side by side resized to the nearest
    Kontext bucket (all about 1 MP), so a 2-image edit holds about as many tokens as a 1-image
    one, and a 512x512 edit conditions on a 1024x1024 canvas."""
    if not conditioning_images:
        return None
    from serve_app.config.models import KONTEXT_RESOLUTIONS
    from serve_app.geometry import nearest_resolution, parse_wxh

    buckets = [parse_wxh(size) for size in KONTEXT_RESOLUTIONS]
    return nearest_resolution(width * conditioning_images, height, buckets)


def image_tokens_in_call(width: int, height: int, conditioning_images: int) -> int:
    """Image tokens one image of a call puts in the transformer's sequence."""
    tokens = (width // PATCH) * (height // PATCH)
    canvas = canvas_size(width, height, conditioning_images)
    if canvas is not None:
        tokens += (canvas[0] // PATCH) * (canvas[1] // PATCH)
    return tokens
