"""Provenance: the machine-readable marks every returned or stored image carries (IPTC digital
source type in XMP, EXIF Software), and optional C2PA manifests signed with the operator's key."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from serve_app.config.base import StrictModel


class C2paConfig(StrictModel):
    """C2PA signing: the operator's certificate chain and private key (PEM), read from files or
    from environment variables like other secrets; never written into the config itself."""

    cert_file: str | None = Field(
        default=None,
        description="PEM certificate chain (signing certificate first, then intermediates); "
        "`~` and `$VARS` expand. Or set `cert_env`.",
    )
    key_file: str | None = Field(
        default=None,
        description="PEM private key of the signing certificate (0600); or set `key_env`.",
    )
    cert_env: str | None = Field(
        default=None, description="Environment variable holding the PEM certificate chain."
    )
    key_env: str | None = Field(
        default=None, description="Environment variable holding the PEM private key."
    )
    algorithm: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        default="es256", description="Signing algorithm; must match the key."
    )
    tsa_url: str | None = Field(
        default=None,
        description="RFC 3161 time-stamp authority URL (optional; the replica must reach it).",
    )


class ProvenanceConfig(StrictModel):
    """Marks on every image this model returns or stores (b64_json, url, job results)."""

    enabled: bool = Field(
        default=True,
        description="Write XMP (IPTC `DigitalSourceType`) and EXIF `Software` into every "
        "PNG, JPEG and WebP this model returns or stores, streamed previews included (they get "
        "no C2PA manifest).",
    )
    software: str = Field(
        default="serve-app",
        min_length=1,
        max_length=200,
        pattern=r"^[ -~]+$",  # printable ASCII: EXIF Software is ASCII, XMP takes no controls
        description="Server name written into EXIF `Software` (followed by the model id).",
    )
    c2pa: C2paConfig | None = Field(
        default=None,
        description="Sign a C2PA manifest into every image (needs `c2pa-python`); off when unset.",
    )

    @model_validator(mode="after")
    def _c2pa_needs_marks(self) -> ProvenanceConfig:
        if self.c2pa is not None and not self.enabled:
            raise ValueError(
                "provenance.c2pa signs the marked images: it needs provenance.enabled: true "
                "(or remove c2pa)"
            )
        return self
