"""Where `response_format=url` images are kept."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from serve_app.config.base import StrictModel


class StorageConfig(StrictModel):
    """Where `response_format=url` images are kept, and how their links are signed."""

    backend: Literal["local", "s3"] = Field(
        default="local",
        description="`local` directory (a shared mount on a cluster) or an `s3` bucket.",
    )
    local_dir: str | None = Field(
        default=None, description="Directory for `local`; default `$SERVE_APP_CACHE/images`."
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base of the links for `local`, e.g. `https://images.example.com`; default "
        "the request's own scheme and Host (set it behind a proxy).",
    )
    url_ttl_s: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="How long a link works; files go after that.",
    )
    secret_env: str = Field(
        default="SERVE_APP_URL_SECRET",
        description="Environment variable holding the HMAC secret for `local` links. Unset: a "
        "random secret per ingress process (links then die with the process; set it when the "
        "ingress has more than one replica).",
    )
    cleanup_interval_s: float = Field(
        default=300, gt=0, description="How often expired images are deleted."
    )
    s3_bucket: str | None = Field(default=None, description="Bucket for `s3`.")
    s3_prefix: str = Field(default="images/", description="Key prefix for `s3`.")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, R2, ...); default AWS."
    )
    s3_region: str | None = Field(default=None, description="Region for `s3`.")

    @model_validator(mode="after")
    def _check_s3(self) -> StorageConfig:
        if self.backend == "s3" and not self.s3_bucket:
            raise ValueError("storage.backend 's3' needs storage.s3_bucket")
        return self
