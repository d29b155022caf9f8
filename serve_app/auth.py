"""API keys: loaded from the environment or a file, kept only as hashes, checked in constant time.

No Ray, no torch. The ingress asks `KeyStore.identify(authorization_header)` for the key's name; the
name (never the key) goes to logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import yaml

from serve_app.config import AuthConfig
from serve_app.contract import APIError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyStore:
    def __init__(self, named_keys: dict[str, str]) -> None:
        if any(not key.strip() for key in named_keys.values()):
            raise ValueError("API keys must not be empty")
        if not all(name.isascii() and name.isprintable() for name in named_keys):
            raise ValueError("API key names must be printable ASCII (they tag logs and metrics)")
        self._hashes = [(name, _digest(key.strip())) for name, key in named_keys.items()]

    @classmethod
    def from_config(cls, config: AuthConfig) -> KeyStore | None:
        """The configured keys, or None when authentication is off."""
        if not config.enabled:
            return None
        keys: dict[str, str] = {}
        if config.api_keys_env:
            value = os.environ.get(config.api_keys_env, "")
            parts = [part.strip() for part in value.split(",") if part.strip()]
            if not parts:
                raise ValueError(f"auth.api_keys_env: ${config.api_keys_env} is empty or unset")
            keys.update({f"env-{i + 1}": part for i, part in enumerate(parts)})
        if config.api_keys_file:
            loaded = yaml.safe_load(Path(config.api_keys_file).read_text())
            if not isinstance(loaded, dict) or not loaded:
                raise ValueError("auth.api_keys_file must map names to keys")
            keys.update({str(name): str(key) for name, key in loaded.items()})
        return cls(keys)

    def __len__(self) -> int:
        return len(self._hashes)

    def identify(self, authorization: str | None) -> str:
        """Name of the key in an `Authorization: Bearer <key>` header; 401 otherwise.

        Every stored hash is compared (no early exit), each in constant time.
        """
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        digest = _digest(presented.strip())
        found = None
        for name, stored in self._hashes:
            if hmac.compare_digest(stored, digest):
                found = name
        if found is None:
            raise _unauthorized("Incorrect API key provided.")
        return found


def _unauthorized(message: str) -> APIError:
    return APIError(
        message, status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )
