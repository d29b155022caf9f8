"""API keys: loaded from the environment or a file, kept only as hashes, checked in constant time.

No Ray, no torch. The ingress asks `KeyStore.identify(authorization_header)` for the key's name; the
name (never the key) goes to logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import deque
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
        unknown = sorted(set(config.moderation_low_keys or ()) - set(keys))
        if unknown:
            raise ValueError(
                f"auth.moderation_low_keys: no API key is named {', '.join(map(repr, unknown))} "
                f"(the keys: {', '.join(sorted(keys))})"
            )
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


class FailedAuthThrottle:
    """Per-client throttling of wrong or missing API keys.

    A client (address) with `max_failures` failed attempts within `window_s` gets 429 with
    Retry-After for further attempts with a wrong key, until its oldest failure ages out. A
    right key is always accepted, so the throttle never locks out a legitimate client. Memory
    is bounded: at most `max_clients` addresses are tracked (the stalest are forgotten).
    """

    def __init__(
        self, max_failures: int = 20, window_s: float = 60, max_clients: int = 10_000
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        return failures

    def check(self, keys: KeyStore, authorization: str | None, client: str) -> str:
        """The key's name, or 401 (wrong key) / 429 (too many wrong keys from this client)."""
        now = time.monotonic()
        try:
            return keys.identify(authorization)
        except APIError:
            failures = self._recent(client, now)
            failures.append(now)
            self._failures.pop(client, None)
            self._failures[client] = failures  # most recent last
            while len(self._failures) > self.max_clients:
                self._failures.pop(next(iter(self._failures)))
            if len(failures) > self.max_failures:
                retry_after = max(1, math.ceil(failures[0] + self.window_s - now))
                raise APIError(
                    "Too many requests with a wrong API key from this client; retry later.",
                    status=429,
                    code="too_many_auth_failures",
                    headers={"Retry-After": str(retry_after)},
                ) from None
            raise
