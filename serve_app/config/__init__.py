"""The one configuration schema: app builder args, per-model settings and batching knobs.

The YAML files under ``configs/``, the app builder and the README's tables are all fed by these
models; defaults live here and nowhere else. No torch, no Ray. One module per concern, every
public name importable from here (``from serve_app.config import ModelConfig``):

- ``base``: ``StrictModel`` (unknown keys are errors);
- ``models``: one served model (``ModelConfig``, ``QualitySteps``, ``SpeedConfig``, ``LoraConfig``,
  the Kontext resolutions and the tiny model's presets);
- ``limits``: ``BatchingConfig``, ``UploadLimits``, ``AuthConfig``;
- ``storage``: ``StorageConfig``;
- ``safety``: ``SafetyConfig`` (moderation), ``provenance``: ``ProvenanceConfig`` (image marks);
- ``jobs``: ``JobsConfig`` (with the consumers' timings, checked against each other) and
  ``WebhookConfig``;
- here: ``AppArgs``, which holds them all.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from serve_app.config.base import StrictModel
from serve_app.config.jobs import JobsConfig, WebhookConfig
from serve_app.config.limits import AuthConfig, BatchingConfig, UploadLimits
from serve_app.config.models import (
    KONTEXT_RESOLUTIONS,
    TINY_DEFAULTS,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    QualityName,
    QualitySteps,
    SpeedConfig,
)
from serve_app.config.provenance import C2paConfig, ProvenanceConfig
from serve_app.config.safety import ClassifierCheck, SafetyConfig
from serve_app.config.storage import StorageConfig

__all__ = [
    "KONTEXT_RESOLUTIONS",
    "TINY_DEFAULTS",
    "AppArgs",
    "AuthConfig",
    "BatchingConfig",
    "C2paConfig",
    "ClassifierCheck",
    "JobsConfig",
    "LoraConfig",
    "ModelConfig",
    "ParallelConfig",
    "ProvenanceConfig",
    "QualityName",
    "QualitySteps",
    "SafetyConfig",
    "SpeedConfig",
    "StorageConfig",
    "StrictModel",
    "UploadLimits",
    "WebhookConfig",
]


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
    max_n: int = Field(default=10, ge=1, le=100, description="Largest `n` a request may ask for.")
    playground: bool = Field(
        default=True,
        description="Serve the browser playground at `/` and `/playground` (a static page that "
        "uses the public API; it holds no secrets, so it is served without a key).",
    )
    access_log: bool = Field(
        default=True,
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
