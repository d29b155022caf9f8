"""Webhooks for finished jobs: where they may go, how they are signed, how they are delivered.

Signing follows Standard Webhooks (standardwebhooks.com): headers `webhook-id`,
`webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`; a
secret written `whsec_<base64>` is used decoded, as the spec's libraries do. Destinations are
checked when the job is submitted and again before every attempt (DNS may change): http(s) only,
no credentials in the URL, the host on the allowlist when there is one, and every address it
resolves to public unless `allow_private`. A failed delivery never fails the job.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from serve_app.config import WebhookConfig
from serve_app.contract import APIError

logger = logging.getLogger("ray.serve")


class WebhookRefused(ValueError):
    """The destination is not allowed; the message says why."""


def secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def check_destination(url: str, config: WebhookConfig) -> str:
    """Raise `WebhookRefused` unless `url` may receive webhooks now; else the checked address
    to connect to (so a DNS answer that changes in between is never used)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("must be an http or https URL with a host")
    if parts.username or parts.password:
        raise WebhookRefused("must not contain credentials")
    host = parts.hostname.lower()
    if config.allowed_hosts and not any(
        fnmatch.fnmatchcase(host, pattern.lower()) for pattern in config.allowed_hosts
    ):
        raise WebhookRefused(f"host {host!r} is not on the webhook allowlist")
    return resolve_allowed(host, port or (443 if parts.scheme == "https" else 80), config)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global, and so is any IPv4 address it carries (mapped, 6to4, Teredo, NAT64)."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour]
        embedded += list(address.teredo or ())
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        return all(inner is None or inner.is_global for inner in embedded)
    return True


def resolve_allowed(host: str, port: int, config: WebhookConfig) -> str:
    """The address to connect to: every address `host` resolves to must be allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise WebhookRefused(f"host {host[:100]!r} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if not config.allow_private and not _public(address):
            raise WebhookRefused(
                f"host {host!r} resolves to a private, loopback or link-local address "
                f"({address}); such destinations are refused"
            )
    return str(addresses[0])


def check_webhook_url(url: str, config: WebhookConfig) -> None:
    """At submission: a 400 naming `webhook_url` for a destination that is not allowed."""
    if not os.environ.get(config.secret_env):
        raise APIError(
            f"webhook_url is not available: the server has no webhook signing secret "
            f"(${config.secret_env}).",
            param="webhook_url",
            code="unsupported_value",
        )
    try:
        check_destination(url, config)
    except WebhookRefused as exc:
        raise APIError(f"Invalid webhook_url: {exc}.", param="webhook_url") from None


class WebhookSender:
    """Delivers events on a small thread pool, retrying with exponential backoff; `outcome`
    is called with `delivered`, `failed` (attempts exhausted) or `refused`. At most
    `MAX_PENDING` events wait; more are dropped as `failed` (logged)."""

    MAX_PENDING = 1000

    def __init__(self, config: WebhookConfig, outcome=None) -> None:
        self.config = config
        self.outcome = outcome or (lambda _: None)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        self._pending = 0
        self._lock = threading.Lock()

    def send(self, url: str, message_id: str, body: bytes) -> None:
        with self._lock:
            if self._pending >= self.MAX_PENDING:
                logger.error("webhook %s dropped: %d deliveries pending", message_id,
                             self._pending)  # fmt: skip
                self.outcome("failed")
                return
            self._pending += 1
        self._pool.submit(self._deliver_counted, url, message_id, body)

    def _deliver_counted(self, url: str, message_id: str, body: bytes) -> None:
        try:
            self.deliver(url, message_id, body)
        except Exception:  # noqa: BLE001 - never lose the outcome of a delivery
            logger.exception("webhook %s failed unexpectedly", message_id)
            self.outcome("failed")
        finally:
            with self._lock:
                self._pending -= 1

    def deliver(self, url: str, message_id: str, body: bytes) -> str:
        secret = os.environ.get(self.config.secret_env)
        result = "failed"
        for attempt in range(self.config.max_attempts):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 60))
            if not secret:
                result = "refused"
                logger.warning("webhook %s not sent: $%s is unset", message_id,
                               self.config.secret_env)  # fmt: skip
                break
            try:
                address = check_destination(url, self.config)
            except WebhookRefused as exc:
                result = "refused"
                logger.warning("webhook %s refused: %s", message_id, exc)
                break
            timestamp = int(time.time())
            signature = sign(secret_bytes(secret), message_id, timestamp, body)
            status = self._post(url, address, message_id, timestamp, signature, body, attempt)
            if status is not None and 200 <= status < 300:
                result = "delivered"
                break
        self.outcome(result)
        logger.info("webhook %s: %s", message_id, result)
        return result

    def _post(self, url, address, message_id, timestamp, signature, body, attempt) -> int | None:
        """POST to the checked address (Host and TLS name stay the URL's); the answer's
        status, without reading its body."""
        import httpx

        parts = urlsplit(url)
        host = f"[{address}]" if ":" in address else address
        netloc = host + (f":{parts.port}" if parts.port else "")
        pinned = parts._replace(netloc=netloc).geturl()
        headers = {
            "host": parts.netloc.rsplit("@", 1)[-1],
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        try:
            with httpx.Client(timeout=self.config.timeout_s, follow_redirects=False) as client:
                request = client.build_request(
                    "POST", pinned, content=body, headers=headers,
                    extensions={"sni_hostname": parts.hostname},
                )  # fmt: skip
                response = client.send(request, stream=True)
                response.close()
                if not 200 <= response.status_code < 300:
                    logger.warning("webhook %s attempt %d: HTTP %d", message_id, attempt + 1,
                                   response.status_code)  # fmt: skip
                return response.status_code
        except httpx.HTTPError as exc:
            logger.warning("webhook %s attempt %d: %s", message_id, attempt + 1, exc)
            return None
