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

from serve_app.cache import images_dir, job_images_dir, stored_secret, url_secret_file
from serve_app.codec import MEDIA_TYPES
from serve_app.config import StorageConfig
from serve_app.contract import APIError
from serve_app.routes import FILES_ROUTE, JOB_FILES_ROUTE

logger = logging.getLogger("ray.serve")

_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp)")
_EXPIRES = re.compile(r"[0-9]{1,12}")  # a Unix time; ASCII only (str.isdigit takes any script)
_SIGNATURE = re.compile(r"[0-9a-f]{64}")  # HMAC-SHA256, hex


class ImageStore(Protocol):
    ttl_s: int  # how long a stored image is kept

    def save(self, data: bytes, output_format: str, base_url: str) -> str:
        """Store one encoded image; return the URL a client downloads it from."""

    def put(self, data: bytes, output_format: str) -> str:
        """Store one encoded image; return its name (jobs keep names, links are made later)."""

    def get(self, name: str) -> bytes:
        """The bytes of a stored image (404 when gone)."""

    def delete(self, name: str) -> None:
        """Remove a stored image (gone already is fine)."""

    def link(self, name: str, base_url: str, expires_at: int) -> str:
        """A URL for a stored image that works until `expires_at` (Unix time)."""

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

    def __init__(
        self, directory: str | Path, secret: bytes, ttl_s: int, route: str = FILES_ROUTE
    ) -> None:
        self.route = route
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.ttl_s = ttl_s

    def sign(self, name: str, expires: int) -> str:
        return hmac.new(self.secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()

    def save(self, data: bytes, output_format: str, base_url: str) -> str:
        return self.link(self.put(data, output_format), base_url, int(time.time()) + self.ttl_s)

    def put(self, data: bytes, output_format: str) -> str:
        name = new_name(output_format)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.directory / name)
        return name

    def get(self, name: str) -> bytes:
        if not _NAME.fullmatch(name):
            raise _no_such_image()
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            raise _no_such_image() from None

    def delete(self, name: str) -> None:
        if _NAME.fullmatch(name):
            (self.directory / name).unlink(missing_ok=True)

    def link(self, name: str, base_url: str, expires_at: int) -> str:
        signature = self.sign(name, expires_at)
        route = f"{base_url.rstrip('/')}{self.route}/{name}"
        return f"{route}?expires={expires_at}&signature={signature}"

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
        return self.get(name), MEDIA_TYPES[name.rsplit(".", 1)[1]]

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
        return self.link(self.put(data, output_format), base_url, int(time.time()) + self.ttl_s)

    def put(self, data: bytes, output_format: str) -> str:
        name = new_name(output_format)
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.prefix + name,
            Body=data,
            ContentType=MEDIA_TYPES[output_format],
        )
        return name

    def get(self, name: str) -> bytes:
        if not _NAME.fullmatch(name):
            raise _no_such_image()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise _no_such_image() from None

    def delete(self, name: str) -> None:
        if _NAME.fullmatch(name):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def link(self, name: str, base_url: str, expires_at: int) -> str:
        expires_in = min(max(1, expires_at - int(time.time())), 7 * 24 * 3600)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.prefix + name},
            ExpiresIn=expires_in,
        )  # fmt: skip

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
    """`$<secret_env>`, else a secret made once and kept in the cache directory (mode 0600), so
    the ingress and the job consumer of one machine sign alike and links survive restarts."""
    secret = os.environ.get(config.secret_env)
    if secret:
        return secret.encode()
    path = url_secret_file()
    secret = stored_secret(path, 64)
    logger.warning(
        "%s is not set: image links are signed with the secret in %s, which only this machine "
        "has; set it on every node of a cluster.",
        config.secret_env,
        path,
    )
    return secret.encode()


def make_store(
    config: StorageConfig, secret: bytes | None = None, route: str = FILES_ROUTE
) -> ImageStore:
    if config.backend == "s3":
        return S3ImageStore(config)
    directory = images_dir(config.local_dir)
    return LocalImageStore(directory, secret or url_secret(config), config.url_ttl_s, route)


def make_job_store(config: StorageConfig, ttl_s: int, secret: bytes | None = None) -> ImageStore:
    """Job results: the same backend, in `jobs/` beside url images, kept `ttl_s`."""
    directory = job_images_dir(config.local_dir)
    jobs = config.model_copy(  # beside, not inside, the url images: their cleanup is sooner
        update={"local_dir": str(directory), "s3_prefix": config.s3_prefix.rstrip("/") + "-jobs/",
                "url_ttl_s": min(ttl_s, 7 * 24 * 3600)}
    )  # fmt: skip
    store = make_store(jobs, secret, JOB_FILES_ROUTE)
    store.ttl_s = ttl_s  # cleanup keeps results as long as their jobs
    return store


async def cleanup_forever(store: ImageStore, interval_s: float) -> None:
    """Delete expired images every `interval_s` (a background task of the ingress)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await asyncio.to_thread(store.cleanup)
            if removed:
                logger.info("deleted %d expired images", removed)
        except Exception:
            logger.exception("image cleanup failed")
