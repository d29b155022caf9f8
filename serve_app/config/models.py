"""Per-model settings: weights, sizes, quality presets, speed switches and LoRA adapters."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from serve_app.config.base import StrictModel
from serve_app.config.provenance import ProvenanceConfig
from serve_app.config.safety import SafetyConfig
from serve_app.families import FAMILIES, KONTEXT_RESOLUTIONS, FamilyName, traits
from serve_app.geometry import PATCH, parse_wxh

QualityName = Literal["low", "medium", "high"]

# What `source: tiny` changes from the production defaults of FLUX.1 Kontext (explicit fields
# still win); each family's own are `FamilyTraits.tiny_defaults`.
TINY_DEFAULTS: dict[str, Any] = FAMILIES["flux-kontext"].tiny_defaults


class QualitySteps(StrictModel):
    """Denoising steps for each OpenAI quality preset."""

    low: int = Field(default=12, ge=1, le=100, description="Steps for `quality=low`.")
    medium: int = Field(
        default=20, ge=1, le=100, description="Steps for `quality=medium` (and `standard`)."
    )
    high: int = Field(default=28, ge=1, le=100, description="Steps for `quality=high` (and `hd`).")


class SpeedConfig(StrictModel):
    """GPU speed switches, all off by default; each trades something for speed (see README)."""

    compile: bool = Field(
        default=False,
        description="torch.compile the transformer's repeated blocks (regional: short compile). "
        "Each new resolution recompiles once; warm up the sizes you serve.",
    )
    quantization: Literal["none", "fp8"] = Field(
        default="none",
        description="`fp8`: torchao float8 dynamic quantization of the transformer's linear "
        "layers (CUDA with compute capability >= 8.9; small quality cost).",
    )
    first_block_cache_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Enable diffusers' first-block cache: skip the rest of the transformer on "
        "steps whose first-block residual changed less than this (FLUX: 0.05-0.12; higher is "
        "faster and drifts further from the uncached image).",
    )
    attention_backend: str | None = Field(
        default=None,
        description="diffusers attention dispatcher backend, e.g. `flash`, `_native_cudnn`, "
        "`sage`; default: PyTorch SDPA.",
    )


# diffusers attention backends that cannot return log-sum-exp values, which Ring attention
# merges its blocks with (diffusers/models/attention_dispatch.py: "does not support return_lse").
NO_LOG_SUM_EXP = frozenset(
    {"native", "_native_efficient", "_native_math", "_native_npu", "_native_xla", "sage_varlen",
     "xformers"}
)  # fmt: skip


class ParallelConfig(StrictModel):
    """Sequence parallelism: one request's tokens split across several GPUs of one node
    (diffusers context parallelism: Ulysses all-to-all and/or Ring attention). The product of
    the degrees is the GPUs (ranks) per replica; 1 = one GPU, as without this section."""

    ulysses: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Ulysses degree: ranks that split the sequence and exchange attention heads "
        "(all-to-all); must divide the transformer's attention heads (FLUX.1: 24).",
    )
    ring: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Ring degree: ranks that split the sequence and pass key/value blocks "
        "around a ring (less memory, more communication steps).",
    )
    collective_timeout_s: float = Field(
        default=120,
        gt=0,
        description="Longest a rank waits in one collective (a dead or hung peer): past it the "
        "call fails with 503 and the replica reports unhealthy, so Ray Serve replaces it.",
    )

    @property
    def degree(self) -> int:
        """Ranks (GPUs) per replica."""
        return self.ulysses * self.ring


class LoraConfig(StrictModel):
    """LoRA adapters for one model: where they are found, and how many a request and a replica
    may use. Adapters are `<name>.safetensors` files (diffusers/PEFT or kohya format); a request
    names them, never a path or URL."""

    dirs: list[str] = Field(
        default_factory=list,
        description="Local directories searched in order for `<name>.safetensors` (`~` and "
        "`$VARS` expand). On a cluster, a directory every node mounts.",
    )
    s3_prefix: str | None = Field(
        default=None,
        description="`s3://bucket/prefix/` searched after `dirs`; replicas download an adapter "
        "once per version (ETag) into the cache directory.",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint for `s3`."
    )
    s3_region: str | None = Field(default=None, description="Region for `s3`.")
    max_per_request: int = Field(
        default=3, ge=1, le=16, description="Most adapters one request may combine."
    )
    min_scale: float = Field(default=-4.0, description="Smallest allowed adapter `scale`.")
    max_scale: float = Field(default=4.0, description="Largest allowed adapter `scale`.")
    max_loaded: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Adapter sets a replica keeps loaded (a set of one is one adapter); "
        "loading one more unloads the least recently used. Ray Serve routes a request to a "
        "replica that holds its set.",
    )

    @field_validator("s3_prefix")
    @classmethod
    def _check_s3_prefix(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"s3://[^/]+/?.*", value):
            raise ValueError(f"s3_prefix must look like s3://bucket/prefix/, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_scales(self) -> LoraConfig:
        if self.min_scale > self.max_scale:
            raise ValueError(f"lora.min_scale {self.min_scale} > max_scale {self.max_scale}")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.dirs or self.s3_prefix)


class ModelConfig(StrictModel):
    """One served model: where its weights come from and how requests map onto it."""

    id: str = Field(
        default="black-forest-labs/FLUX.1-Kontext-dev",
        min_length=1,
        description="Model id clients name in `model`; also listed by `GET /v1/models`.",
    )
    family: FamilyName = Field(
        default="flux-kontext",
        description="Model family (docs/api.md lists what each serves): `flux-kontext` "
        "(FLUX.1 Kontext [dev]), `flux` (FLUX.1 [dev] / [schnell]), `flux2-klein` (FLUX.2 "
        "[klein] 4B), `qwen-image` (Qwen-Image), `qwen-image-edit` (Qwen-Image-Edit: edits and "
        "variations only). It picks the pipelines, the endpoints served and the defaults of "
        "the fields below.",
    )
    source: str = Field(
        default="black-forest-labs/FLUX.1-Kontext-dev",
        min_length=1,
        description="`tiny` (the embedded random model), `synthetic` (FLUX.1-Kontext-dev's "
        "architecture with random weights, for measuring speed and memory), a hub id, or a "
        "local directory.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype; `auto` = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="`auto` = CUDA when available, else CPU."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Where the `tiny` model is saved; default `$SERVE_APP_CACHE` or "
        "`~/.cache/serve_app`.",
    )
    default_size: str = Field(default="1024x1024", description="Size used for `size=auto` (`WxH`).")
    min_side: int = Field(
        default=256, ge=16, description="Smallest allowed width or height, pixels."
    )
    max_side: int = Field(
        default=2048, ge=16, description="Largest allowed width or height, pixels."
    )
    max_pixels: int = Field(
        default=2048 * 2048, ge=256, description="Largest allowed width x height of one image."
    )
    quality_steps: QualitySteps = Field(
        default_factory=QualitySteps, description="Steps per quality preset."
    )
    default_quality: QualityName = Field(
        default="high", description="Preset used for `quality=auto` (and when `quality` is absent)."
    )
    default_guidance: float = Field(
        default=2.5, ge=0, le=100, description="Guidance scale used when `guidance` is absent."
    )
    preferred_resolutions: list[str] = Field(
        default_factory=lambda: list(KONTEXT_RESOLUTIONS),
        min_length=1,
        description="`WxH` buckets: input images are resized to the one nearest their aspect "
        "ratio before conditioning, and edits/variations with `size=auto` are generated at it.",
    )
    variation_prompt: str = Field(
        default="Create a variation of this image: keep its subject, composition and style, and "
        "vary the details.",
        min_length=1,
        description="Instruction used by `/v1/images/variations`.",
    )
    image_strength: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Families that edit by image-to-image (`flux`, `qwen-image`): how much of "
        "an unmasked edit's or a variation's input is re-noised (1 = none of it is kept).",
    )
    negative_prompt: str = Field(
        default=" ",
        description="Families with true classifier-free guidance (`qwen-image`, "
        "`qwen-image-edit`): the negative prompt of calls whose guidance is above 1 "
        "(Qwen-Image's model card uses one space).",
    )
    preview_decoder: Literal["latent_rgb", "vae"] = Field(
        default="latent_rgb",
        description="Streaming previews: `latent_rgb` projects the denoised-latent estimate to "
        "RGB linearly (calibrated on the model's VAE at load; ~free, blurry, upscaled) or `vae` "
        "decodes it fully (exact, costs one VAE decode per preview).",
    )
    max_sequence_length: int = Field(
        default=512,
        ge=1,
        le=512,
        description="T5 text context in tokens; longer prompts get a 400.",
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig, description="Speed options.")
    cpu_offload: bool = Field(
        default=False,
        description="Model CPU offload (CUDA only): fits GPUs under ~40 GB at a large speed cost.",
    )
    vae_tiling: bool = Field(
        default=False, description="Decode in tiles: less memory for large sizes."
    )
    vae_slicing: bool = Field(default=False, description="Decode a batch one image at a time.")
    warmup: bool = Field(
        default=True,
        description="Generate once per warm-up size (text-to-image and edit) before the "
        "replica reports healthy, compiling if `speed.compile`.",
    )
    warmup_sizes: list[str] = Field(
        default_factory=list, description="`WxH` sizes to warm up; default: `default_size`."
    )
    max_pipeline_call_s: float = Field(
        default=900,
        gt=0,
        description="A pipeline call running longer than this counts as hung: the replica "
        "fails its health check and Ray Serve replaces it.",
    )
    num_cpus: float = Field(
        default=1,
        ge=0,
        description="CPUs Ray reserves for each replica (each rank with `parallel`): "
        "tokenizers, PNG encoding; on CPU, torch's threads. Set here, not in the deployment's "
        "`ray_actor_options`, so that the placement group of a parallel replica matches.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads in the replica; default: the CPUs Ray gave it.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA adapters (off until a source is set)."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="Sequence parallelism across GPUs of one node (docs/gpu.md); the builder "
        "gives each replica one placement-group bundle per rank.",
    )
    safety: SafetyConfig = Field(
        default_factory=SafetyConfig,
        description="Moderation of prompts, input and output images (off until `enabled`).",
    )
    provenance: ProvenanceConfig = Field(
        default_factory=ProvenanceConfig,
        description="Marks on every image returned or stored (on by default), optional C2PA.",
    )

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        """The family's defaults, and for the embedded tiny model presets that keep CPU
        generation under a second; fields the config sets win."""
        if not isinstance(data, dict):
            return data
        family = data.get("family", "flux-kontext")
        if family not in FAMILIES:
            return data  # the field's own validation names the allowed families
        defaults = dict(traits(family).defaults)
        if data.get("source") == "tiny":
            defaults |= traits(family).tiny_defaults
        return {**defaults, **data}

    @field_validator("default_size")
    @classmethod
    def _check_default_size(cls, value: str) -> str:
        parse_wxh(value)  # ValueError names the expected form
        return value

    @field_validator("preferred_resolutions", "warmup_sizes")
    @classmethod
    def _check_resolutions(cls, values: list[str]) -> list[str]:
        for value in values:
            width, height = parse_wxh(value)
            if width % PATCH or height % PATCH:
                raise ValueError(f"resolution {value!r} must have sides that are multiples of 16")
        return values

    @property
    def resolution_buckets(self) -> list[tuple[int, int]]:
        return [parse_wxh(r) for r in self.preferred_resolutions]

    @model_validator(mode="after")
    def _check_bounds(self) -> ModelConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        width, height = parse_wxh(self.default_size)
        for side in (width, height):
            if side % PATCH or not self.min_side <= side <= self.max_side:
                raise ValueError(
                    f"default_size {self.default_size} must have sides that are multiples of 16 "
                    f"within [{self.min_side}, {self.max_side}]"
                )
        if width * height > self.max_pixels:
            raise ValueError(f"default_size {self.default_size} exceeds max_pixels")
        backend = self.speed.attention_backend
        if self.parallel.ring > 1 and (backend is None or backend in NO_LOG_SUM_EXP):
            raise ValueError(
                f"parallel.ring > 1 needs an attention backend that returns log-sum-exp values "
                f"(speed.attention_backend: flash, _native_cudnn, _native_flash, sage, ...); "
                f"{backend or 'the default (native)'} does not: use parallel.ulysses instead, "
                "or set one of those backends"
            )
        family = traits(self.family)
        if self.parallel.degree > 1 and not family.context_parallel:
            runs = ", ".join(name for name, f in FAMILIES.items() if f.context_parallel)
            raise ValueError(
                f"parallel (sequence parallelism) is not supported for family {self.family!r} "
                f"({family.parallel_note}); it runs for {runs}: remove the parallel section"
            )
        switched_on = {
            "compile": self.speed.compile,
            "quantization": self.speed.quantization != "none",
            "first_block_cache_threshold": self.speed.first_block_cache_threshold is not None,
            "attention_backend": self.speed.attention_backend is not None,
        }
        refused = sorted(
            name for name, on in switched_on.items() if on and name not in family.speed_switches
        )
        if refused:
            raise ValueError(
                f"speed.{', speed.'.join(refused)} is not supported for family {self.family!r} "
                f"({family.title}); it runs speed.{', speed.'.join(sorted(family.speed_switches))}"
            )
        if self.parallel.degree > 1 and self.cpu_offload:
            raise ValueError(
                "parallel (several GPUs per replica) and cpu_offload exclude each other: "
                "offloading is for a model that does not fit one GPU's memory; remove one"
            )
        return self

    @property
    def deployment_name(self) -> str:
        """Ray deployment name for this model; YAML `deployments:` entries refer to it."""
        return "ImageModel-" + re.sub(r"[^A-Za-z0-9_.-]", "-", self.id)
