"""The SSRF guards end to end, with `allow_private` off (the integration app runs with it on):
the real `WebhookSender` against real receivers on 127.0.0.1, no Ray. The resolver is the input
(`resolve[name] = address`), and so is the network: a connect to `PUBLIC` reaches the local
receiver on that port, so a check that passes still lands somewhere the test can see."""

from __future__ import annotations

import datetime
import socket
import ssl

import pytest

from serve_app.config import WebhookConfig
from serve_app.contract import APIError
from serve_app.jobs.webhooks import WebhookSender, check_webhook_url
from tests.unit.test_webhooks import SECRET, Receiver, fake_resolver, outcomes, take

PUBLIC = "93.184.215.14"  # a global address: passes the check; connects are routed locally
CONFIG = WebhookConfig(max_attempts=2)  # allow_private off


@pytest.fixture
def resolve(monkeypatch):
    return fake_resolver(monkeypatch)


@pytest.fixture
def connects(monkeypatch):
    """Every TCP connect the sender makes, as (address, port); `PUBLIC` goes to 127.0.0.1 and
    anything else off this machine is refused (no packet leaves the test)."""
    made: list[tuple[str, int]] = []
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        made.append(address)
        if address[0] == PUBLIC:
            return real(("127.0.0.1", address[1]), *args, **kwargs)
        if address[0] not in ("127.0.0.1", "::1"):
            raise ConnectionRefusedError(f"test network: no route to {address}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", SECRET)
    return made


@pytest.fixture
def receiver():
    made = []

    def make(*args, **kwargs):
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_a_private_destination_is_refused_before_any_connection(resolve, connects, receiver):
    hook = receiver()
    resolve["hook.test"] = "127.0.0.1"
    hosts = ["hook.test", "127.0.0.1", "[::ffff:127.0.0.1]", "[::127.0.0.1]"]
    urls = [f"http://{host}:{hook.port}/x" for host in hosts]
    for url in urls:
        with pytest.raises(APIError, match="private"):
            check_webhook_url(url, CONFIG)  # at submission: a 400
    results, outcome = outcomes()
    sender = WebhookSender(CONFIG, outcome)
    for n, url in enumerate(urls):  # and at delivery, had it got through
        sender.send(url, f"msg_{n}", b"{}")
    assert take(results, len(urls), timeout_s=5) == ["refused"] * len(urls)
    assert connects == [] and hook.connections == 0


def test_dns_rebinding_to_loopback_is_refused_at_delivery(resolve, connects, receiver):
    hook = receiver()
    url = f"http://rebind.test:{hook.port}/x"
    resolve["rebind.test"] = PUBLIC
    check_webhook_url(url, CONFIG)  # public at submission
    resolve["rebind.test"] = "127.0.0.1"  # ... loopback by the time the job finishes
    results, outcome = outcomes()
    WebhookSender(CONFIG, outcome).send(url, "msg", b"{}")
    assert take(results, 1, timeout_s=5) == ["refused"]
    assert connects == [] and hook.connections == 0


def test_a_redirect_is_not_followed(resolve, connects, receiver):
    target = receiver()
    for location in (f"http://127.0.0.1:{target.port}/stolen", f"http://{PUBLIC}:{target.port}/"):
        hop = receiver(status=302, headers={"location": location})
        resolve["hook.test"] = PUBLIC
        results, outcome = outcomes()
        WebhookSender(CONFIG, outcome).send(f"http://hook.test:{hop.port}/x", "msg", b"{}")
        assert take(results, 1, timeout_s=10) == ["failed"]  # a 3xx is a failed attempt
        assert len(hop.requests) == CONFIG.max_attempts
        assert target.connections == 0 and set(connects) == {(PUBLIC, hop.port)}
        connects.clear()


def test_the_connection_goes_to_the_checked_address_with_host_and_sni_kept(
    tmp_path, resolve, connects, receiver
):
    from standardwebhooks.webhooks import Webhook

    cert, key = _self_signed(tmp_path, "hook.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    seen_sni = []
    server_tls.sni_callback = lambda _sock, name, _ctx: seen_sni.append(name)
    hook = receiver(ssl_context=server_tls)
    answers = iter([PUBLIC])  # the check's answer; any later lookup gets loopback
    resolve["hook.test"] = lambda: next(answers, "127.0.0.1")
    results, outcome = outcomes()
    trust = ssl.create_default_context(cafile=str(cert))
    sender = WebhookSender(CONFIG, outcome, ssl_context=trust)
    sender.send(f"https://hook.test:{hook.port}/x?a=1", "msg_1", b'{"id": "imgjob_1"}')
    assert take(results, 1, timeout_s=10) == ["delivered"]
    assert connects == [(PUBLIC, hook.port)]  # the checked address, not a second lookup
    assert seen_sni == ["hook.test"]
    [(_, headers, body)] = hook.requests
    assert headers["host"] == f"hook.test:{hook.port}" and hook.paths == ["/x?a=1"]
    assert Webhook(SECRET).verify(body, headers) == {"id": "imgjob_1"}


def _self_signed(directory, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
