"""Batching knobs, request and upload limits, and API keys."""

from __future__ import annotations

from pydantic import Field, model_validator

from serve_app.config.base import StrictModel


class BatchingConfig(StrictModel):
    """Dynamic batching knobs; a model deployment's `user_config`, changeable at runtime."""

    max_batch_images: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Most images (sum of `n`) in one pipeline call. On a GPU, when not set, the "
        "default is capped by what fits in memory (measured at warm-up); a set value that "
        "cannot fit is refused with the measured numbers.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.005,
        ge=0,
        le=10,
        description="Once the pipeline is free, how long it waits for more requests before "
        "starting a call that is not full (requests that arrive during a call join the next one "
        "anyway).",
    )


class UploadLimits(StrictModel):
    """Limits on requests and on input images for edits and variations."""

    max_image_bytes: int = Field(
        default=25 * 1024 * 1024, ge=1, description="Largest uploaded file, bytes (413 over it)."
    )
    max_input_pixels: int = Field(
        default=24_000_000,
        ge=1,
        description="Most pixels one input image may decode to, checked from its header before "
        "decoding (400 over it). JPEGs decode reduced (by up to 8 per side) to about the model's "
        "largest side, so only PNG and WebP pay their full size.",
    )
    max_input_pixels_per_request: int = Field(
        default=48_000_000,
        ge=1,
        description="Most pixels all input images and the mask of one request may decode to "
        "(400 over it). The model conditions on one canvas of about 1 MP (FLUX Kontext's "
        "buckets), and inputs are shrunk to the model's `max_side` as soon as they are decoded.",
    )
    max_decoding_pixels: int = Field(
        default=96_000_000,
        ge=1,
        description="Most pixels the ingress process decodes at once, over all requests; a "
        "request beyond it waits up to `decode_wait_s`, then gets a 503 with Retry-After. "
        "It bounds the ingress's image memory: measured about 5 bytes per pixel at the peak "
        "(96 MP: about 0.5 GB; docs/operations.md).",
    )
    decode_wait_s: float = Field(
        default=10,
        ge=0,
        description="How long a request waits for the decoding budget (503 after).",
    )
    max_input_images: int = Field(
        default=4, ge=1, le=16, description="Most images in one edit (references are stitched)."
    )
    max_request_bytes: int = Field(
        default=110 * 1024 * 1024, ge=1, description="Largest request body, bytes (413 over it)."
    )
    max_json_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest JSON body without images, bytes (413 over it).",
    )
    max_prompt_chars: int = Field(
        default=20_000, ge=1, description="Longest prompt in characters, checked before tokenizing."
    )
    max_pixels_per_request: int = Field(
        default=10 * 1024 * 1024,
        ge=1,
        description="Most output pixels in one request (n x width x height).",
    )
    request_timeout_s: float = Field(
        default=300,
        gt=0,
        description="Longest a request may take end to end; past it the work is cancelled and "
        "the client gets a 504 (keep Ray's http_options.request_timeout_s above it).",
    )
    body_timeout_s: float = Field(
        default=60,
        gt=0,
        description="Longest a request body may take to arrive (from when the endpoint starts "
        "reading it, at once); past it the client gets a 408 (`body_timeout`). Ray Serve hands "
        "a request to the ingress as soon as its headers arrive, and the replica holds one of "
        "its `max_ongoing_requests` slots while the body streams in: a slow upload must not "
        "keep it for the whole `request_timeout_s`.",
    )
    max_uploads_per_client: int = Field(
        default=8,
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
        default=None,
        description="Environment variable holding one key, or several separated by commas "
        "(named `env-1`, `env-2`, ...).",
    )
    api_keys_file: str | None = Field(
        default=None, description="YAML file mapping a name to each key (`alice: sk-...`)."
    )
    moderation_low_keys: list[str] | None = Field(
        default=None,
        description="Names of the keys that may send `moderation: low` (others get a 400); "
        "unset: every key. A model's `safety.allow_low: false` forbids it for all.",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)

    @model_validator(mode="after")
    def _low_keys_need_keys(self) -> AuthConfig:
        if self.moderation_low_keys is not None and not self.enabled:
            raise ValueError(
                "auth.moderation_low_keys names API keys, but no keys are configured "
                "(api_keys_env / api_keys_file): without keys no request has a name"
            )
        return self
