"""Where `response_format=url` images live: a local directory or an S3-compatible bucket.

Local links point at this server (`GET /v1/images/files/{name}`) and are signed with an HMAC over
the file name and expiry, so they cannot be forged or extended; S3 links are the bucket's own
presigned URLs. Both backends delete images once their links have expired.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol

from serve_app.codec import MEDIA_TYPES
from serve_app.config import StorageConfig, cache_root
from serve_app.contract import APIError

logger = logging.getLogger("ray.serve")

FILES_ROUTE = "/v1/images/files"
_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp)")
_EXPIRES = re.compile(r"[0-9]{1,12}")  # a Unix time; ASCII only (str.isdigit takes any script)
_SIGNATURE = re.compile(r"[0-9a-f]{64}")  # HMAC-SHA256, hex


class ImageStore(Protocol):
    def save(self, data: bytes, output_format: str, base_url: str) -> str:
        """Store one encoded image; return the URL a client downloads it from."""

    def read(self, name: str, expires: str | None, signature: str | None) -> tuple[bytes, str]:
        """The bytes and media type behind a link this server signed; 403/404 otherwise."""

    def cleanup(self) -> int:
        """Delete expired images; return how many went."""


def _no_such_image() -> APIError:
    return APIError("No such image.", status=404, code="not_found")


def new_name(output_format: str) -> str:
    return f"{secrets.token_urlsafe(18)}.{output_format}"


class LocalImageStore:
    """A directory (a shared mount on a cluster) served back by the ingress with signed links."""

    def __init__(self, directory: str | Path, secret: bytes, ttl_s: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.ttl_s = ttl_s

    def sign(self, name: str, expires: int) -> str:
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()

    def save(self, data: bytes, output_format: str, base_url: str) -> str:
        name = new_name(output_format)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)
        expires = int(time.time()) + self.ttl_s
        signature = self.sign(name, expires)
        return f"{base_url.rstrip('/')}{FILES_ROUTE}/{name}?expires={expires}&signature={signature}"

    def read(self, name: str, expires: str | None, signature: str | None) -> tuple[bytes, str]:
        """The image behind a link: 403 when the signature is wrong, 404 when expired or gone."""
        if not _NAME.fullmatch(name):
            raise _no_such_image()
        if not expires or not signature:
            raise APIError("The link is not signed.", status=403, code="invalid_signature")
        if not _EXPIRES.fullmatch(expires) or not _SIGNATURE.fullmatch(signature):
            raise APIError("The link's signature is invalid.", status=403, code="invalid_signature")
        if not hmac.compare_digest(self.sign(name, int(expires)), signature):
            raise APIError("The link's signature is invalid.", status=403, code="invalid_signature")
        if int(expires) < time.time():
            raise APIError("The link has expired.", status=404, code="expired")
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:
            raise _no_such_image() from None
        return data, MEDIA_TYPES[name.rsplit(".", 1)[1]]

    def cleanup(self) -> int:
        cutoff = time.time() - self.ttl_s
        removed = 0
        for path in self.directory.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class S3ImageStore:
    """An S3-compatible bucket; links are presigned GET URLs that expire with the TTL."""

    def __init__(self, config: StorageConfig) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = config.s3_bucket
        self.prefix = config.s3_prefix
        self.ttl_s = config.url_ttl_s
        # Credentials come from the standard AWS environment (never from the serve config).
        self.client = boto3.client(
            "s3",
            endpoint_url=config.s3_endpoint_url,
            region_name=config.s3_region,
            config=Config(signature_version="s3v4"),  # presigned links S3-compatible stores accept
        )

    def save(self, data: bytes, output_format: str, base_url: str) -> str:
        key = self.prefix + new_name(output_format)
        self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=MEDIA_TYPES[output_format]
        )
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.ttl_s
        )

    def read(self, name: str, expires: str | None, signature: str | None) -> tuple[bytes, str]:
        """S3 links are the bucket's own presigned URLs; this server serves no files."""
        raise _no_such_image()

    def cleanup(self) -> int:
        cutoff = time.time() - self.ttl_s
        expired = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        )
        for page in pages:
            for item in page.get("Contents", []):
                if item["LastModified"].timestamp() < cutoff:
                    expired.append({"Key": item["Key"]})
        for start in range(0, len(expired), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": expired[start : start + 1000]}
            )
        return len(expired)


def url_secret(config: StorageConfig) -> bytes:
    secret = os.environ.get(config.secret_env)
    if secret:
        return secret.encode()
    logger.warning(
        "%s is not set: image links are signed with a random per-process secret and stop working "
        "when this ingress replica restarts; set it when running more than one ingress replica.",
        config.secret_env,
    )
    return secrets.token_bytes(32)


def make_store(config: StorageConfig) -> ImageStore:
    if config.backend == "s3":
        return S3ImageStore(config)
    directory = config.local_dir or cache_root() / "images"
    return LocalImageStore(directory, url_secret(config), config.url_ttl_s)


async def cleanup_forever(store: ImageStore, interval_s: float) -> None:
    """Delete expired images every `interval_s` (a background task of the ingress)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await asyncio.to_thread(store.cleanup)
            if removed:
                logger.info("deleted %d expired images", removed)
        except Exception:  # noqa: BLE001 - keep cleaning next time
            logger.exception("image cleanup failed")
