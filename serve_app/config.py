"""The one configuration schema: app builder args, per-model settings and batching knobs.

The YAML files under ``configs/``, the app builder and the README's tables are all fed by these
models; defaults live here and nowhere else. No torch, no Ray.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.geometry import PATCH, parse_wxh

QualityName = Literal["low", "medium", "high"]

# The resolutions FLUX.1 Kontext was trained on (diffusers' PREFERRED_KONTEXT_RESOLUTIONS), ~1 MP.
KONTEXT_RESOLUTIONS = [
    "672x1568", "688x1504", "720x1456", "752x1392", "800x1328", "832x1248", "880x1184",
    "944x1104", "1024x1024", "1104x944", "1184x880", "1248x832", "1328x800", "1392x752",
    "1456x720", "1504x688", "1568x672",
]  # fmt: skip


def cache_root() -> Path:
    """Where generated files live by default: `$SERVE_APP_CACHE` or `~/.cache/serve_app`."""
    return Path(os.environ.get("SERVE_APP_CACHE") or Path.home() / ".cache" / "serve_app")


def stored_secret(path: Path, hex_chars: int) -> str:
    """A random secret made once at `path` (mode 0600, written atomically) and read back after:
    every process of this machine that asks gets the same one."""
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(hex_chars // 2))
        os.replace(partial, path)
    return path.read_text().strip()


def _half_side(resolution: str) -> str:
    width, height = parse_wxh(resolution)
    return f"{round(width / 32) * 16}x{round(height / 32) * 16}"


# What `source: tiny` changes from the production defaults (explicit fields still win).
TINY_DEFAULTS: dict[str, Any] = {
    "quality_steps": {"low": 2, "medium": 4, "high": 8},
    "default_quality": "medium",
    "min_side": 64,
    # Kontext's buckets at half the side (~0.25 MP): the same aspect ratios, CPU-friendly.
    "preferred_resolutions": [_half_side(r) for r in KONTEXT_RESOLUTIONS],
}


class StrictModel(BaseModel):
    """Config is written by operators: a misspelt key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class QualitySteps(StrictModel):
    """Denoising steps for each OpenAI quality preset."""

    low: int = Field(12, ge=1, le=100, description="Steps for `quality=low`.")
    medium: int = Field(
        20, ge=1, le=100, description="Steps for `quality=medium` (and `standard`)."
    )
    high: int = Field(28, ge=1, le=100, description="Steps for `quality=high` (and `hd`).")


class SpeedConfig(StrictModel):
    """GPU speed switches, all off by default; each trades something for speed (see README)."""

    compile: bool = Field(
        False,
        description="torch.compile the transformer's repeated blocks (regional: short compile). "
        "Each new resolution recompiles once; warm up the sizes you serve.",
    )
    quantization: Literal["none", "fp8"] = Field(
        "none",
        description="`fp8`: torchao float8 dynamic quantization of the transformer's linear "
        "layers (CUDA with compute capability >= 8.9; small quality cost).",
    )
    first_block_cache_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Enable diffusers' first-block cache: skip the rest of the transformer on "
        "steps whose first-block residual changed less than this (FLUX: 0.05-0.12; higher is "
        "faster and drifts further from the uncached image).",
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers attention dispatcher backend, e.g. `flash`, `_native_cudnn`, "
        "`sage`; default: PyTorch SDPA.",
    )


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
        None,
        description="`s3://bucket/prefix/` searched after `dirs`; replicas download an adapter "
        "once per version (ETag) into the cache directory.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint for `s3`.")
    s3_region: str | None = Field(None, description="Region for `s3`.")
    max_per_request: int = Field(
        3, ge=1, le=16, description="Most adapters one request may combine."
    )
    min_scale: float = Field(-4.0, description="Smallest allowed adapter `scale`.")
    max_scale: float = Field(4.0, description="Largest allowed adapter `scale`.")
    max_loaded: int = Field(
        4,
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
        "black-forest-labs/FLUX.1-Kontext-dev",
        min_length=1,
        description="Model id clients name in `model`; also listed by `GET /v1/models`.",
    )
    source: str = Field(
        "black-forest-labs/FLUX.1-Kontext-dev",
        min_length=1,
        description="`tiny` (the embedded random model), `synthetic` (FLUX.1-Kontext-dev's "
        "architecture with random weights, for measuring speed and memory), a hub id, or a "
        "local directory.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; `auto` = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="`auto` = CUDA when available, else CPU."
    )
    cache_dir: str | None = Field(
        None,
        description="Where the `tiny` model is saved; default `$SERVE_APP_CACHE` or "
        "`~/.cache/serve_app`.",
    )
    default_size: str = Field("1024x1024", description="Size used for `size=auto` (`WxH`).")
    min_side: int = Field(256, ge=16, description="Smallest allowed width or height, pixels.")
    max_side: int = Field(2048, ge=16, description="Largest allowed width or height, pixels.")
    max_pixels: int = Field(
        2048 * 2048, ge=256, description="Largest allowed width x height of one image."
    )
    quality_steps: QualitySteps = Field(
        default_factory=QualitySteps, description="Steps per quality preset."
    )
    default_quality: QualityName = Field(
        "high", description="Preset used for `quality=auto` (and when `quality` is absent)."
    )
    default_guidance: float = Field(
        2.5, ge=0, le=100, description="Guidance scale used when `guidance` is absent."
    )
    preferred_resolutions: list[str] = Field(
        default_factory=lambda: list(KONTEXT_RESOLUTIONS),
        min_length=1,
        description="`WxH` buckets: input images are resized to the one nearest their aspect "
        "ratio before conditioning, and edits/variations with `size=auto` are generated at it.",
    )
    variation_prompt: str = Field(
        "Create a variation of this image: keep its subject, composition and style, and vary "
        "the details.",
        min_length=1,
        description="Instruction used by `/v1/images/variations`.",
    )
    preview_decoder: Literal["latent_rgb", "vae"] = Field(
        "latent_rgb",
        description="Streaming previews: `latent_rgb` projects the denoised-latent estimate to "
        "RGB linearly (calibrated on the model's VAE at load; ~free, blurry, upscaled) or `vae` "
        "decodes it fully (exact, costs one VAE decode per preview).",
    )
    max_sequence_length: int = Field(
        512, ge=1, le=512, description="T5 text context in tokens; longer prompts get a 400."
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig, description="Speed options.")
    cpu_offload: bool = Field(
        False,
        description="Model CPU offload (CUDA only): fits GPUs under ~40 GB at a large speed cost.",
    )
    vae_tiling: bool = Field(False, description="Decode in tiles: less memory for large sizes.")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time.")
    warmup: bool = Field(
        True,
        description="Generate once per warm-up size (text-to-image and edit) before the "
        "replica reports healthy, compiling if `speed.compile`.",
    )
    warmup_sizes: list[str] = Field(
        default_factory=list, description="`WxH` sizes to warm up; default: `default_size`."
    )
    max_pipeline_call_s: float = Field(
        900,
        gt=0,
        description="A pipeline call running longer than this counts as hung: the replica "
        "fails its health check and Ray Serve replaces it.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads in the replica; default: the CPUs Ray gave it.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA adapters (off until a source is set)."
    )

    @model_validator(mode="before")
    @classmethod
    def _tiny_defaults(cls, data: Any) -> Any:
        """The embedded tiny model gets presets that keep CPU generation under a second."""
        if isinstance(data, dict) and data.get("source") == "tiny":
            data = {**TINY_DEFAULTS, **data}
        return data

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
        return self

    @property
    def deployment_name(self) -> str:
        """Ray deployment name for this model; YAML `deployments:` entries refer to it."""
        return "ImageModel-" + re.sub(r"[^A-Za-z0-9_.-]", "-", self.id)


class BatchingConfig(StrictModel):
    """Dynamic batching knobs; a model deployment's `user_config`, changeable at runtime."""

    max_batch_images: int = Field(
        8,
        ge=1,
        le=64,
        description="Most images (sum of `n`) in one pipeline call. On a GPU, when not set, the "
        "default is capped by what fits in memory (measured at warm-up); a set value that "
        "cannot fit is refused with the measured numbers.",
    )
    batch_wait_timeout_s: float = Field(
        0.005,
        ge=0,
        le=10,
        description="Once the pipeline is free, how long it waits for more requests before "
        "starting a call that is not full (requests that arrive during a call join the next one "
        "anyway).",
    )


class UploadLimits(StrictModel):
    """Limits on requests and on input images for edits and variations."""

    max_image_bytes: int = Field(
        25 * 1024 * 1024, ge=1, description="Largest uploaded file, bytes (413 over it)."
    )
    max_input_pixels: int = Field(
        24_000_000,
        ge=1,
        description="Most pixels one input image may decode to, checked from its header before "
        "decoding (400 over it). JPEGs decode reduced (by up to 8 per side) to about the model's "
        "largest side, so only PNG and WebP pay their full size.",
    )
    max_input_pixels_per_request: int = Field(
        48_000_000,
        ge=1,
        description="Most pixels all input images and the mask of one request may decode to "
        "(400 over it). The model conditions on one canvas of about 1 MP (FLUX Kontext's "
        "buckets), and inputs are shrunk to the model's `max_side` as soon as they are decoded.",
    )
    max_decoding_pixels: int = Field(
        96_000_000,
        ge=1,
        description="Most pixels the ingress process decodes at once, over all requests; a "
        "request beyond it waits up to `decode_wait_s`, then gets a 503 with Retry-After. "
        "It bounds the ingress's image memory: measured about 5 bytes per pixel at the peak "
        "(96 MP: about 0.5 GB; docs/operations.md).",
    )
    decode_wait_s: float = Field(
        10, ge=0, description="How long a request waits for the decoding budget (503 after)."
    )
    max_input_images: int = Field(
        4, ge=1, le=16, description="Most images in one edit (references are stitched)."
    )
    max_request_bytes: int = Field(
        110 * 1024 * 1024, ge=1, description="Largest request body, bytes (413 over it)."
    )
    max_json_bytes: int = Field(
        1024 * 1024, ge=1, description="Largest JSON body without images, bytes (413 over it)."
    )
    max_prompt_chars: int = Field(
        20_000, ge=1, description="Longest prompt in characters, checked before tokenizing."
    )
    max_pixels_per_request: int = Field(
        10 * 1024 * 1024,
        ge=1,
        description="Most output pixels in one request (n x width x height).",
    )
    request_timeout_s: float = Field(
        300,
        gt=0,
        description="Longest a request may take end to end; past it the work is cancelled and "
        "the client gets a 504 (keep Ray's http_options.request_timeout_s above it).",
    )
    body_timeout_s: float = Field(
        60,
        gt=0,
        description="Longest a request body may take to arrive (from when the endpoint starts "
        "reading it, at once); past it the client gets a 408 (`body_timeout`). Ray Serve hands "
        "a request to the ingress as soon as its headers arrive, and the replica holds one of "
        "its `max_ongoing_requests` slots while the body streams in: a slow upload must not "
        "keep it for the whole `request_timeout_s`.",
    )
    max_uploads_per_client: int = Field(
        8,
        ge=1,
        description="Most request bodies one client address may be sending at once, counting "
        "only those still arriving after 1 s; one more gets a 429 (`too_many_uploads`) with "
        "Retry-After. Keep it well under the ingress's `max_ongoing_requests` (256), so that "
        "one client's slow uploads leave room for `/health` and everyone else.",
    )

    @model_validator(mode="after")
    def _check_budgets(self) -> UploadLimits:
        if self.max_decoding_pixels < self.max_input_pixels_per_request:
            raise ValueError(
                "limits.max_decoding_pixels must be at least max_input_pixels_per_request, or "
                "the largest allowed request could never be decoded"
            )
        if self.max_input_pixels_per_request < self.max_input_pixels:
            raise ValueError("limits.max_input_pixels_per_request must be >= max_input_pixels")
        return self


class AuthConfig(StrictModel):
    """Optional API keys. Keys never appear in config: only where to read them from."""

    api_keys_env: str | None = Field(
        None,
        description="Environment variable holding one key, or several separated by commas "
        "(named `env-1`, `env-2`, ...).",
    )
    api_keys_file: str | None = Field(
        None, description="YAML file mapping a name to each key (`alice: sk-...`)."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class StorageConfig(StrictModel):
    """Where `response_format=url` images are kept, and how their links are signed."""

    backend: Literal["local", "s3"] = Field(
        "local", description="`local` directory (a shared mount on a cluster) or an `s3` bucket."
    )
    local_dir: str | None = Field(
        None, description="Directory for `local`; default `$SERVE_APP_CACHE/images`."
    )
    public_base_url: str | None = Field(
        None,
        description="Base of the links for `local`, e.g. `https://images.example.com`; default "
        "the request's own scheme and Host (set it behind a proxy).",
    )
    url_ttl_s: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="How long a link works; files go after that."
    )
    secret_env: str = Field(
        "SERVE_APP_URL_SECRET",
        description="Environment variable holding the HMAC secret for `local` links. Unset: a "
        "random secret per ingress process (links then die with the process; set it when the "
        "ingress has more than one replica).",
    )
    cleanup_interval_s: float = Field(
        300, gt=0, description="How often expired images are deleted."
    )
    s3_bucket: str | None = Field(None, description="Bucket for `s3`.")
    s3_prefix: str = Field("images/", description="Key prefix for `s3`.")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, ...); default AWS."
    )
    s3_region: str | None = Field(None, description="Region for `s3`.")

    @model_validator(mode="after")
    def _check_s3(self) -> StorageConfig:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("storage.backend 's3' needs storage.s3_bucket")
        return self


class WebhookConfig(StrictModel):
    """Where finished jobs may be POSTed, and how the deliveries are signed."""

    secret_env: str = Field(
        "SERVE_APP_WEBHOOK_SECRET",
        description="Environment variable holding the signing secret (Standard Webhooks: "
        "`whsec_` + base64, or any text); its key must be at least 24 bytes, else the app "
        "fails to start naming the variable. Unset: `webhook_url` is refused.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a `webhook_url` may name (`example.com`, `*.example.com`); empty: "
        "any host with a public address.",
    )
    allow_private: bool = Field(
        False,
        description="Allow private, loopback and link-local addresses (tests, a private "
        "network). Off: such destinations are refused at submission and again at delivery.",
    )
    timeout_s: float = Field(
        10,
        gt=0,
        le=120,
        description="Deadline of one delivery attempt, all of it (connect, send, the answer's "
        "status line and headers); a slower receiver fails the attempt, which is retried.",
    )
    workers: int = Field(4, ge=1, le=64, description="Delivery threads per replica.")
    max_per_host: int = Field(
        2,
        ge=1,
        le=64,
        description="Delivery attempts in flight at once to one host (the URL's host name, "
        "any port); more wait their turn, so a slow host cannot hold every delivery thread.",
    )
    max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per event, with exponential backoff from 1 s."
    )


class JobsConfig(StrictModel):
    """Asynchronous jobs (`Prefer: respond-async`): Ray Serve task consumers on Redis."""

    enabled: bool = Field(True, description="Serve `Prefer: respond-async` and `/v1/images/jobs`.")
    redis_url: str | None = Field(
        None,
        description="Broker, result store and job state. Unset: `$<redis_url_env>` if set, "
        "else an embedded `redis-server` the app starts (data under the cache directory).",
    )
    redis_url_env: str = Field(
        "SERVE_APP_REDIS_URL", description="Environment variable read when `redis_url` is unset."
    )
    redis_password_file: str | None = Field(
        None,
        description="A file holding the Redis password (e.g. a mounted Kubernetes secret), "
        "used when the URL has none; keeps the password out of configs and of what Ray logs. "
        "With the embedded Redis, the app points it at that server's own file.",
    )
    embedded: bool = Field(
        True,
        description="With no URL, start a local `redis-server` (one machine: `serve run`). "
        "Turn off on clusters: with no URL, job requests then get 503 saying what to set.",
    )
    embedded_port: int = Field(
        6390, ge=1, le=65535, description="Port of the embedded Redis on 127.0.0.1."
    )
    queue_name: str = Field("serve_app_images", min_length=1, description="Celery queue.")
    max_queued: int = Field(
        1000,
        ge=1,
        description="Most jobs waiting for the model (submitted, not yet started on it: in the "
        "queue or taken by a consumer); a submission past it gets 429 `queue_full` + Retry-After.",
    )
    max_queued_per_key: int | None = Field(
        None,
        ge=1,
        description="Most of those one API key may have (with auth off, all requests share one "
        "key); past it 429 `queue_full`. Unset: only `max_queued` applies.",
    )
    result_ttl_s: int = Field(
        24 * 3600, ge=60, description="How long a finished job and its images are kept."
    )
    max_retries: int = Field(
        2, ge=0, le=10, description="Retries of a job whose model replica failed mid-call."
    )
    retry_backoff_max_s: int = Field(
        30, ge=1, le=600, description="Longest wait before a retry (exponential from 1 s)."
    )
    visibility_timeout_s: int = Field(
        900,
        ge=10,  # longer than a consumer's heartbeat takes to go stale (serve_app/jobs/store.py)
        description="A job taken by a consumer that died is handed out again after this long "
        "(Redis broker); a job running longer is not run twice (heartbeats).",
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest a job may run, counted from when its model accepts it (time in "
        "the jobs queue does not count); past it the model's work stops and the job fails with "
        "`job_timeout`. Unset: `limits.request_timeout_s`, as for a synchronous request.",
    )
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig, description="Webhooks.")


class AppArgs(StrictModel):
    """Arguments of `serve_app.app:build_app` (the `args:` of a serve config)."""

    models: list[ModelConfig] = Field(
        default_factory=lambda: [ModelConfig(id="flux-kontext-tiny", source="tiny")],
        min_length=1,
        description="Served models; the first is the default for requests without `model`.",
    )
    batching: BatchingConfig = Field(
        default_factory=BatchingConfig,
        description="Default batching for every model deployment (its `user_config`); a YAML "
        "`deployments:` entry's `user_config` overrides it per deployment.",
    )
    max_n: int = Field(10, ge=1, le=100, description="Largest `n` a request may ask for.")
    playground: bool = Field(
        True,
        description="Serve the browser playground at `/` and `/playground` (a static page that "
        "uses the public API; it holds no secrets, so it is served without a key).",
    )
    access_log: bool = Field(
        True,
        description="Ray Serve's per-request access log lines in the proxy and each replica "
        "(`request_done` lines are always written).",
    )
    limits: UploadLimits = Field(
        default_factory=UploadLimits, description="Request and input image limits."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys (off by default).")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Storage for `response_format=url`."
    )
    jobs: JobsConfig = Field(
        default_factory=JobsConfig, description="Asynchronous jobs and webhooks."
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> AppArgs:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        return self
