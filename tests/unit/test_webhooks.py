"""Webhook delivery against real receivers on 127.0.0.1 (no Ray): the secret's form, which
addresses count as private, and that slow receivers cannot stall other hosts' webhooks."""

from __future__ import annotations

import base64
import ipaddress
import json
import queue
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.config import WebhookConfig
from serve_app.jobs.webhooks import WebhookRefused, WebhookSender, check_destination, sign

SECRET = "whsec_" + base64.b64encode(b"unit-test-webhook-secret-32-bytes").decode()


# --- real receivers and a resolver the test controls ---------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records every connection and request, and answers
    `status` (with `headers`)."""

    def __init__(self, status: int = 204, headers: dict | None = None, ssl_context=None) -> None:
        self.connections = 0
        self.requests: list[tuple[float, dict, bytes]] = []  # (when, lowercase headers, body)
        self.paths: list[str] = []
        self.got = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                seen = {name.lower(): value for name, value in self.headers.items()}
                outer.requests.append((time.monotonic(), seen, body))
                outer.paths.append(self.path)
                outer.got.set()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:
                outer.connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SlowReceiver:
    """Reads the request, then drips `HTTP/1.1 200 OK...` one byte every `drip_s` and never
    finishes; records each connection's (opened, closed by the client) times."""

    def __init__(self, drip_s: float = 0.25) -> None:
        self.drip_s = drip_s
        self.spans: list[list[float]] = []
        self.open_now = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        span = [time.monotonic(), None]
        with self._lock:
            self.spans.append(span)
            self.open_now += 1
        answer = b"HTTP/1.1 200 OK\r\n" * 1000
        try:
            conn.recv(65536)
            for byte in answer:
                readable, _, _ = select.select([conn], [], [], self.drip_s)
                if self._stop.is_set() or (readable and not conn.recv(65536)):
                    break  # the client gave up (or the test ended)
                conn.send(bytes([byte]))
        except OSError:
            pass
        finally:
            span[1] = time.monotonic()
            with self._lock:
                self.open_now -= 1
            conn.close()

    def finished(self, count: int, timeout_s: float = 3) -> list[list[float]]:
        """The spans, once `count` connections have been closed by the client."""
        until = time.monotonic() + timeout_s
        while sum(closed is not None for _, closed in self.spans) < count:
            assert time.monotonic() < until, f"{len(self.spans)} connections, not {count} closed"
            time.sleep(0.02)
        return self.spans

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def resolve(monkeypatch):
    return fake_resolver(monkeypatch)


def fake_resolver(monkeypatch) -> dict:
    """`resolve["name"] = "address"` (or a function returning one, called per lookup) makes
    `name` resolve to it (the sender's input); numeric hosts and other names resolve as usual."""
    names: dict = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in names:
            address = names[host]() if callable(names[host]) else names[host]
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


def outcomes() -> tuple[queue.Queue, callable]:
    results: queue.Queue = queue.Queue()
    return results, results.put


def take(results: queue.Queue, count: int, timeout_s: float) -> list[str]:
    return [results.get(timeout=timeout_s) for _ in range(count)]


# --- the signing secret --------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret, reason",
    [
        ("whsec_", "not a valid webhook secret"),  # would sign with an empty key
        ("whsec_not base64!", "not a valid webhook secret"),
        ("whsec_" + base64.b64encode(b"x" * 23).decode(), "23-byte signing key"),
        ("too short a text", "16-byte signing key"),
    ],
)
def test_a_malformed_or_short_secret_stops_the_sender_naming_the_variable(
    monkeypatch, secret, reason
):
    monkeypatch.setenv("MY_WEBHOOK_SECRET", secret)
    with pytest.raises(ValueError, match=reason) as caught:
        WebhookSender(WebhookConfig(secret_env="MY_WEBHOOK_SECRET"))
    assert "$MY_WEBHOOK_SECRET (jobs.webhooks.secret_env)" in str(caught.value)
    assert secret.removeprefix("whsec_") not in str(caught.value) or not secret[6:]


def test_valid_secrets_sign_as_the_standard_webhooks_library_verifies(monkeypatch):
    from standardwebhooks.webhooks import Webhook

    from tests.integration.conftest import WEBHOOK_SECRET

    unpadded = "whsec_" + base64.b64encode(b"k" * 25).decode().rstrip("=")
    for secret in (WEBHOOK_SECRET, SECRET, unpadded):
        monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", secret)
        sender = WebhookSender(WebhookConfig())
        body, timestamp = b'{"id": "imgjob_1"}', int(time.time())
        headers = {"webhook-id": "m", "webhook-timestamp": str(timestamp),
                   "webhook-signature": sign(sender.key, "m", timestamp, body)}  # fmt: skip
        assert Webhook(secret).verify(body, headers) == {"id": "imgjob_1"}
    monkeypatch.delenv("SERVE_APP_WEBHOOK_SECRET")
    assert WebhookSender(WebhookConfig()).key is None  # unset: webhook_url is refused instead


# --- which addresses are private -----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
        "::ffff:0:a9fe:a9fe",  # IPv4-translated 169.254.169.254
        "::ffff:127.0.0.1",  # IPv4-mapped
        "64:ff9b::7f00:1",  # NAT64 well-known prefix
        "64:ff9b:1::a9fe:a9fe",  # NAT64 local-use prefix (RFC 8215), never public
        "64:ff9b:1:7f00:0:100::",  # ... 127.0.0.1 in the /48 layout
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "fec0::1",  # site-local
        "ff0e::1",  # global-scope multicast
        "239.1.2.3",
        "100.64.0.1",
    ],
)
def test_addresses_that_embed_or_are_private_are_refused(address):
    host = f"[{address}]" if ":" in address else address
    with pytest.raises(WebhookRefused, match="private"):
        check_destination(f"http://{host}:8080/hook", WebhookConfig())


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2001:4860:4860::8888", "64:ff9b::808:808", "::8.8.8.8"]
)
def test_public_addresses_and_their_ipv6_forms_pass(address):
    host = f"[{address}]" if ":" in address else address
    checked = check_destination(f"https://{host}/hook", WebhookConfig())
    assert ipaddress.ip_address(checked) == ipaddress.ip_address(address)


# --- slow receivers --------------------------------------------------------------------------


@pytest.fixture
def receivers():
    made = []

    def make(kind, *args, **kwargs):
        made.append(kind(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def test_slow_receivers_do_not_delay_another_hosts_webhook(monkeypatch, resolve, receivers):
    monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", SECRET)
    resolve["slow.test"] = resolve["fast.test"] = "127.0.0.1"
    slow, fast = receivers(SlowReceiver), receivers(Receiver)
    config = WebhookConfig(allow_private=True, timeout_s=2, max_attempts=1)  # 4 workers, 2/host
    results, outcome = outcomes()
    sender = WebhookSender(config, outcome)
    for n in range(4):  # as many as there are delivery threads
        sender.send(f"http://slow.test:{slow.port}/hook", f"slow_{n}", b"{}")
    time.sleep(0.2)
    sent = time.monotonic()
    sender.send(f"http://fast.test:{fast.port}/hook", "fast", b'{"id": "fast"}')
    assert fast.got.wait(1.0), "the fast host's webhook waited behind the slow host's"
    assert fast.requests[0][0] - sent < 1.0 and fast.requests[0][2] == b'{"id": "fast"}'
    assert slow.open_now >= 1  # ... while the slow ones were still dripping
    # every slow attempt ends at its deadline (two at a time: max_per_host), as a failure
    assert sorted(take(results, 5, timeout_s=10)) == ["delivered"] + ["failed"] * 4
    # Two at a time, judged by when each connection opened: the receiver notices a client's close
    # only when its thread next runs, so counting open sockets races on a busy machine.
    opened = sorted(start for start, _ in slow.finished(4))
    assert len(opened) == 4 and opened[1] - opened[0] < 1.0, (
        "two slow attempts should start at once"
    )
    assert opened[2] - opened[0] >= 1.5, "a third attempt started before a per-host slot was freed"
    for opened, closed in slow.spans:
        assert 1.8 < closed - opened < 2.8, "an attempt outlived timeout_s"


def test_a_slow_attempt_fails_at_its_deadline_and_is_retried(monkeypatch, receivers):
    monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", SECRET)
    slow = receivers(SlowReceiver, drip_s=0.1)  # a byte every 0.1 s: no read ever times out
    results, outcome = outcomes()
    sender = WebhookSender(WebhookConfig(allow_private=True, timeout_s=1, max_attempts=2),
                           outcome)  # fmt: skip
    started = time.monotonic()
    sender.send(f"http://127.0.0.1:{slow.port}/hook", "slow", b"{}")
    assert take(results, 1, timeout_s=10) == ["failed"]
    assert len(slow.finished(2)) == 2, "the timed-out attempt was not retried per max_attempts"
    (first_open, first_close), (second_open, second_close) = slow.spans
    assert 0.9 < first_close - first_open < 1.6 and 0.9 < second_close - second_open < 1.6
    assert second_open - first_close >= 0.9  # the backoff (1 s) before the retry
    assert time.monotonic() - started < 5


def test_a_failing_hosts_backoff_does_not_hold_a_delivery_thread(monkeypatch, receivers):
    monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", SECRET)
    failing, fast = receivers(Receiver, status=500), receivers(Receiver)
    results, outcome = outcomes()
    config = WebhookConfig(allow_private=True, workers=1, max_attempts=3)
    sender = WebhookSender(config, outcome)
    sender.send(f"http://127.0.0.1:{failing.port}/hook", "failing", b"{}")
    assert failing.got.wait(2)
    time.sleep(0.2)  # now waiting 1 s before its second attempt
    sender.send(f"http://localhost:{fast.port}/hook", "fast", json.dumps({}).encode())
    assert fast.got.wait(0.8), "a retry's backoff held the only delivery thread"
    assert sorted(take(results, 2, timeout_s=10)) == ["delivered", "failed"]
    assert len(failing.requests) == 3
