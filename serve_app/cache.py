"""The cache directory: every file the app makes for itself, and the one place that names them.

The root is `$SERVE_APP_CACHE`, else `~/.cache/serve_app`. Under it::

    <root>/
    ├── redis/                   the embedded Redis (`redis_dir`): redis.conf, append-only
    │   │                        files, redis.pid, redis.log
    │   └── password             its password (`redis_password_file`, 0600)
    ├── url-secret               HMAC secret of local image links (`url_secret_file`, 0600)
    ├── images/                  `response_format=url` images (`images_dir`)
    │   └── jobs/                job results (`job_images_dir`), kept as long as their jobs
    ├── lora/                    S3 adapters the ingress's registries download (`lora_dir`)
    │   └── <deployment name>/   ... and those a model deployment's replicas download
    └── tiny-<family>-v<N>/      the embedded tiny model of each family (`tiny_model_dir`)

`storage.local_dir` moves `images/` (and so `images/jobs/`), and a model's `cache_dir` its tiny
model; nothing else moves. Secrets are made once per machine by `stored_secret` (0600, written
atomically), so every process of the machine reads the same one. No torch, no Ray, no config:
callers pass what they were configured with.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def redis_dir() -> Path:
    """The embedded Redis's data, config, pid and log."""
    return cache_root() / "redis"


def redis_password_file() -> Path:
    """The embedded Redis's password file, beside its data; the path only (see
    `serve_app.jobs.queue.embedded_password_file`, which makes the password)."""
    return redis_dir() / "password"


def url_secret_file() -> Path:
    """The secret that signs local image links when `storage.secret_env` is unset."""
    return cache_root() / "url-secret"


def images_dir(local_dir: str | None = None) -> Path:
    """`response_format=url` images: `storage.local_dir`, else `<root>/images`."""
    return Path(local_dir) if local_dir else cache_root() / "images"


def job_images_dir(local_dir: str | None = None) -> Path:
    """Job results: `jobs/` inside the url images' directory."""
    return images_dir(local_dir) / "jobs"


def lora_dir(deployment_name: str | None = None) -> Path:
    """Downloaded S3 adapters: the ingress's at `<root>/lora`, a model deployment's replicas'
    at `<root>/lora/<deployment name>`."""
    root = cache_root() / "lora"
    return root / deployment_name if deployment_name else root


def tiny_model_dir(version: str, family: str = "flux-kontext") -> Path:
    """The embedded tiny model of a family at build recipe `version` (its runner's
    `tiny_version`)."""
    return cache_root() / f"tiny-{family}-v{version}"
