"""Webhooks for finished jobs: where they may go, how they are signed, how they are delivered.

Signing follows Standard Webhooks (standardwebhooks.com): headers `webhook-id`,
`webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`; a
secret written `whsec_<base64>` is used decoded, as the spec's libraries do, and must hold at
least `MIN_KEY_BYTES` (checked when the sender is built, so a bad secret stops the deployment).
Destinations are checked when the job is submitted and again before every attempt (DNS may
change): http(s) only, no credentials in the URL, the host on the allowlist when there is one,
and every address it resolves to public unless `allow_private`; the attempt then connects to the
checked address. Each attempt has one deadline (`timeout_s`) and each host at most
`max_per_host` attempts in flight, so a slow receiver delays only its own host's webhooks. A
failed delivery never fails the job.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from serve_app.config import WebhookConfig
from serve_app.contract import APIError

logger = logging.getLogger("ray.serve")


class WebhookRefused(ValueError):
    """The destination is not allowed; the message says why."""


MIN_KEY_BYTES = 24  # Standard Webhooks: secrets of 24 to 64 random bytes
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def secret_bytes(secret: str) -> bytes:
    """The HMAC key: `whsec_<base64>` decoded (padding optional, as in the spec's libraries),
    any other text as UTF-8. `ValueError` for a `whsec_` secret that is not base64."""
    if not secret.startswith("whsec_"):
        return secret.encode()
    encoded = secret.removeprefix("whsec_")
    if not _BASE64.fullmatch(encoded) or len(encoded.rstrip("=")) % 4 == 1:
        raise ValueError("after `whsec_` must come standard base64 (A-Z a-z 0-9 + /)")
    encoded = encoded.rstrip("=")
    return base64.b64decode(encoded + "=" * (-len(encoded) % 4))


def signing_key(config: WebhookConfig) -> bytes | None:
    """The key in `$<secret_env>`, None when unset; `ValueError` naming the variable when it
    is malformed or shorter than `MIN_KEY_BYTES` (never echoing the secret)."""
    secret = os.environ.get(config.secret_env)
    if not secret:
        return None
    where = f"${config.secret_env} (jobs.webhooks.secret_env)"
    try:
        key = secret_bytes(secret)
    except ValueError as exc:
        raise ValueError(f"{where} is not a valid webhook secret: {exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"{where} holds a {len(key)}-byte signing key; at least {MIN_KEY_BYTES} bytes are "
            f"needed (Standard Webhooks: `whsec_` + base64 of 24 to 64 random bytes)"
        )
    return key


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


# IPv6 blocks whose last 32 bits are an IPv4 address: NAT64 well-known (RFC 6052),
# IPv4-compatible (RFC 4291, deprecated) and IPv4-translated (RFC 2765); mapped, 6to4 and Teredo
# have their own accessors.
_LOW32_IPV4 = [ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")]
# Never public though Python may call them global: NAT64 local-use (RFC 8215; the IPv4 address
# sits around the u-octet there) and site-local (RFC 3879, deprecated).
_NOT_PUBLIC = [ipaddress.ip_network(n) for n in ("64:ff9b:1::/48", "fec0::/10")]


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    if any(address in network for network in _LOW32_IPV4):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [inner for inner in found if inner is not None]


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast, and so is every IPv4 address it carries."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NOT_PUBLIC):
            return False
        return all(_public(inner) for inner in _embedded_ipv4(address))
    return True


def resolve_allowed(host: str, port: int, config: WebhookConfig) -> str:
    """The address to connect to: every address `host` resolves to must be allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise WebhookRefused(f"host {host[:100]!r} does not resolve") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
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


@dataclass
class _Event:
    url: str
    message_id: str
    body: bytes
    host: str  # what `max_per_host` counts by
    attempt: int = 0


class WebhookSender:
    """Delivers events on `workers` threads, at most `max_per_host` attempts per host at once
    (the others wait for that host, not for the pool), retrying with exponential backoff off the
    pool; `outcome` is called with `delivered`, `failed` (attempts exhausted) or `refused`. At
    most `MAX_PENDING` events wait; more are dropped as `failed` (logged). A malformed secret
    raises `ValueError` here, naming the variable. `ssl_context`: the trust store for https
    receivers (default: the system's / certifi's)."""

    MAX_PENDING = 1000

    def __init__(self, config: WebhookConfig, outcome=None, ssl_context=None) -> None:
        self.config = config
        self.outcome = outcome or (lambda _: None)
        self.key = signing_key(config)
        self.ssl_context = ssl_context
        self._pool = ThreadPoolExecutor(config.workers, thread_name_prefix="webhook")
        self._lock = threading.Condition()
        self._pending = 0
        self._active: dict[str, int] = {}  # host -> attempts in flight
        self._waiting: dict[str, deque[_Event]] = {}  # host -> events waiting for a slot
        self._retries: list[tuple[float, int, _Event]] = []  # heap of (due, seq, event)
        self._sequence = itertools.count()
        self._retry_thread: threading.Thread | None = None

    def send(self, url: str, message_id: str, body: bytes) -> None:
        with self._lock:
            if self._pending >= self.MAX_PENDING:
                logger.error("webhook %s dropped: %d deliveries pending", message_id,
                             self._pending)  # fmt: skip
                self.outcome("failed")
                return
            self._pending += 1
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        self._start(_Event(url, message_id, body, host))

    # --- scheduling: a slot per host, retries off the pool ------------------------------------
    def _start(self, event: _Event) -> None:
        with self._lock:
            if self._active.get(event.host, 0) >= self.config.max_per_host:
                self._waiting.setdefault(event.host, deque()).append(event)
                return
            self._active[event.host] = self._active.get(event.host, 0) + 1
        self._pool.submit(self._run, event)

    def _run(self, event: _Event) -> None:
        try:
            result = self.attempt(event.url, event.message_id, event.body, event.attempt)
        except Exception:
            logger.exception("webhook %s failed unexpectedly", event.message_id)
            result = "failed"
        finally:
            with self._lock:  # hand the host's slot to its next event, else free it
                queue = self._waiting.get(event.host)
                following = queue.popleft() if queue else None
                if queue is not None and not queue:
                    del self._waiting[event.host]
                if following is None:
                    self._active[event.host] -= 1
                    if not self._active[event.host]:
                        del self._active[event.host]
            if following is not None:
                self._pool.submit(self._run, following)
        if result == "retry" and event.attempt + 1 < self.config.max_attempts:
            event.attempt += 1
            self._retry_later(event, min(2 ** (event.attempt - 1), 60))
        else:
            self._finish(event, "failed" if result == "retry" else result)

    def _retry_later(self, event: _Event, delay_s: float) -> None:
        with self._lock:
            heapq.heappush(self._retries, (time.monotonic() + delay_s, next(self._sequence), event))
            if self._retry_thread is None:
                self._retry_thread = threading.Thread(
                    target=self._retry_loop, name="webhook-retries", daemon=True
                )
                self._retry_thread.start()
            self._lock.notify()

    def _retry_loop(self) -> None:
        while True:
            with self._lock:
                while not self._retries or self._retries[0][0] > time.monotonic():
                    due = self._retries[0][0] - time.monotonic() if self._retries else None
                    self._lock.wait(due)
                _, _, event = heapq.heappop(self._retries)
            self._start(event)

    def _finish(self, event: _Event, result: str) -> None:
        self.outcome(result)
        logger.info("webhook %s: %s", event.message_id, result)
        with self._lock:
            self._pending -= 1

    # --- one attempt ---------------------------------------------------------------------------
    def attempt(self, url: str, message_id: str, body: bytes, attempt: int = 0) -> str:
        """`delivered`, `refused` (no secret, or the destination is not allowed now) or
        `retry` (an error, a timeout or a non-2xx answer)."""
        if self.key is None:
            logger.warning("webhook %s not sent: $%s is unset", message_id,
                           self.config.secret_env)  # fmt: skip
            return "refused"
        try:
            address = check_destination(url, self.config)
        except WebhookRefused as exc:
            logger.warning("webhook %s refused: %s", message_id, exc)
            return "refused"
        timestamp = int(time.time())
        signature = sign(self.key, message_id, timestamp, body)
        status = self._post(url, address, message_id, timestamp, signature, body, attempt)
        return "delivered" if status is not None and 200 <= status < 300 else "retry"

    def _post(self, url, address, message_id, timestamp, signature, body, attempt) -> int | None:
        """POST to the checked address (Host and TLS name stay the URL's), all within
        `timeout_s`; the answer's status, without reading its body. Redirects are not
        followed (a 3xx is a failed attempt)."""
        import httpcore

        parts = urlsplit(url)
        headers: dict[str | bytes, str | bytes] = {
            "host": parts.netloc.rsplit("@", 1)[-1],
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature,
        }
        deadline = time.monotonic() + self.config.timeout_s
        backend = _PinnedBackend(address, deadline)
        try:
            with httpcore.ConnectionPool(
                ssl_context=self.ssl_context,
                max_connections=1,
                network_backend=backend,  # type: ignore[arg-type]  # duck-typed httpcore backend
            ) as pool:
                with pool.stream("POST", url, headers=headers, content=body) as response:
                    status = response.status
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                httpcore.UnsupportedProtocol, OSError) as exc:  # fmt: skip
            reason = "no answer within timeout_s" if time.monotonic() >= deadline else exc
            logger.warning("webhook %s attempt %d: %s", message_id, attempt + 1, reason)
            return None
        if not 200 <= status < 300:
            logger.warning("webhook %s attempt %d: HTTP %d", message_id, attempt + 1, status)
        return status


def _remaining(deadline: float) -> float:
    import httpcore

    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the attempt's deadline passed")
    return left


class _PinnedBackend:
    """An httpcore network backend that connects to the checked address whatever host the URL
    names, with every operation bounded by what is left of the attempt's deadline (a receiver
    dripping bytes cannot stretch it)."""

    def __init__(self, address: str, deadline: float) -> None:
        import httpcore

        self.address, self.deadline = address, deadline
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self._backend.connect_tcp(
            self.address, port, _remaining(self.deadline), local_address, socket_options
        )
        return _DeadlineStream(stream, self.deadline)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise OSError("webhooks go over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _DeadlineStream:
    WRITE_CHUNK = 16 * 1024

    def __init__(self, stream, deadline: float) -> None:
        self._stream, self.deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _remaining(self.deadline))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), self.WRITE_CHUNK):
            self._stream.write(buffer[start : start + self.WRITE_CHUNK], _remaining(self.deadline))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        stream = self._stream.start_tls(ssl_context, server_hostname, _remaining(self.deadline))
        return _DeadlineStream(stream, self.deadline)

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)
