"""The LoRA adapter registry: adapter names -> `.safetensors` files in configured places.

Requests name adapters; only this module turns a name into a file, and only inside the
configured directories and S3 prefix (a name is a plain file stem: no separators, no `..`),
and into the name the adapter has inside the pipeline (`pipeline_name`).
The ingress asks it whether an adapter exists and what to list; a model replica asks it for a
local file to load (downloading from S3 once per object version). No torch, no Ray.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from serve_app.cache import lora_dir
from serve_app.config import LoraConfig
from serve_app.contract import APIError

SUFFIX = ".safetensors"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_name(name: str, param: str) -> str:
    """A valid adapter name, or a 400 naming `param` (path-like names never reach a file)."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise APIError(
            f"Invalid adapter name {str(name)[:120]!r}: names are 1-100 letters, digits, '_', "
            "'-' or '.', starting with a letter or digit (no paths).",
            param=param,
            code="invalid_adapter_name",
        )
    return name


def pipeline_name(name: str) -> str:
    """The adapter's name inside the pipeline. PEFT keeps adapters as module names, which may
    not hold '.' (`anime.v2`) nor shadow a module attribute (`train`, `forward`), so each name
    maps to its letters, digits and '_' plus a digest of the whole name (distinct names stay
    distinct: `a.b` and `a_b` differ)."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{digest}"


def not_found(name: str, model_id: str, param: str) -> APIError:
    return APIError(
        f"The adapter {name!r} does not exist for model {model_id!r}; GET /v1/models lists "
        "the available ones as '<model>:<adapter>'.",
        status=404,
        param=param,
        code="adapter_not_found",
    )


class AdapterRegistry:
    """Adapters of one model, from `lora.dirs` (in order) and then `lora.s3_prefix`."""

    def __init__(self, model_id: str, config: LoraConfig, cache_dir: str | None = None) -> None:
        self.model_id = model_id
        self.config = config
        self.dirs = [Path(os.path.expandvars(os.path.expanduser(d))) for d in config.dirs]
        self.cache = Path(cache_dir) if cache_dir else lora_dir()
        self._s3 = None
        self.bucket, self.prefix = "", ""
        if config.s3_prefix:
            self.bucket, _, self.prefix = config.s3_prefix.removeprefix("s3://").partition("/")

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def names(self) -> list[str]:
        """Every adapter available, sorted; the first place holding a name wins."""
        found: set[str] = set()
        for directory in self.dirs:
            if directory.is_dir():
                found.update(
                    path.name.removesuffix(SUFFIX)
                    for path in directory.iterdir()
                    if path.name.endswith(SUFFIX) and path.is_file()
                )
        if self.bucket:
            found.update(self._s3_names())
        return sorted(name for name in found if NAME.fullmatch(name) and ".." not in name)

    def exists(self, name: str) -> bool:
        return self._local(name) is not None or bool(self.bucket and self._s3_etag(name))

    def check(self, names: list[str], param: str) -> None:
        """404 `adapter_not_found` for the first name that is not available."""
        for name in names:
            if not self.exists(name):
                raise not_found(name, self.model_id, param)

    def fetch(self, name: str) -> Path:
        """A local file holding the adapter: its file in a directory, or a cached download of
        the S3 object (keyed by its ETag, so a replaced object is downloaded again)."""
        check_name(name, "lora")
        local = self._local(name)
        if local is not None:
            return local
        etag = self._s3_etag(name) if self.bucket else None
        if not etag:
            raise not_found(name, self.model_id, "lora")
        digest = hashlib.sha256(f"{self.bucket}/{self.prefix}{name}:{etag}".encode()).hexdigest()
        target = self.cache / f"{name}-{digest[:16]}{SUFFIX}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".part")
            os.close(fd)
            try:
                self._client().download_file(self.bucket, self._key(name), partial)
                os.replace(partial, target)  # atomic: readers never see half a file
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        return target

    def _local(self, name: str) -> Path | None:
        check_name(name, "lora")
        for directory in self.dirs:
            path = directory / f"{name}{SUFFIX}"
            if path.is_file():
                return path
        return None

    def _key(self, name: str) -> str:
        return f"{self.prefix}{name}{SUFFIX}"

    def _client(self):
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client(
                "s3", endpoint_url=self.config.s3_endpoint_url, region_name=self.config.s3_region
            )
        return self._s3

    def _s3_etag(self, name: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            head = self._client().head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head["ETag"].strip('"')

    def _s3_names(self) -> list[str]:
        names = []
        paginator = self._client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"):
            for item in page.get("Contents", []):
                stem = item["Key"][len(self.prefix) :]
                if stem.endswith(SUFFIX):
                    names.append(stem.removesuffix(SUFFIX))
        return names
