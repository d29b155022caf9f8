"""Slow uploads on the running app: trickled bodies cannot hold every ingress slot.

Ray Serve's proxy hands a request to the ingress replica once its headers arrive, and the replica
holds one of its `max_ongoing_requests` slots while the body streams in. The app is redeployed
here with a 16-slot ingress (the size that was blacked out by 20 tricklers), at most 4 slow
bodies per client and a 4 s body deadline, then put back.
"""

import asyncio
import copy
import json
import time

import httpx
import pytest

from tests.integration.conftest import TEST_LIMITS

INGRESS_SLOTS = 16
PER_CLIENT = 4
BODY_TIMEOUT_S = 4
TRICKLERS = 20
BOUNDARY = "trickle"


@pytest.fixture(scope="module")
def small_ingress(base_url, serve_config, redeploy):
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    app["args"]["limits"] = {
        **TEST_LIMITS,
        "body_timeout_s": BODY_TIMEOUT_S,
        "max_uploads_per_client": PER_CLIENT,
    }
    ingress = next(d for d in app["deployments"] if d["name"] == "ImagesIngress")
    ingress["max_ongoing_requests"] = INGRESS_SLOTS
    redeploy(config)
    try:
        yield base_url
    finally:
        redeploy(serve_config)


class AnswerCollector(asyncio.Protocol):
    """Keeps every byte the server sent, even when the connection then ends in a reset.

    A server that answers before the body is complete closes with the trickled bytes unread,
    and the kernel turns that close into a reset. asyncio's StreamReader raises the reset in
    place of the answer already buffered; this protocol keeps the answer.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.first_byte = asyncio.Event()
        self.closed = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.first_byte.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.first_byte.set()
        self.closed.set()


async def trickle_upload(host: str, port: int, for_s: float) -> tuple[int, dict, dict, float]:
    """A multipart edit whose image arrives one byte per 0.2 s; what the server answers, and
    after how long."""
    loop = asyncio.get_running_loop()
    transport, answer = await loop.create_connection(AnswerCollector, host, port)
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    head = (
        f"POST /v1/images/edits HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    transport.write(head + part)
    started = time.monotonic()
    try:
        while not answer.first_byte.is_set() and time.monotonic() - started < for_s:
            try:
                await asyncio.wait_for(answer.first_byte.wait(), 0.2)
            except TimeoutError:
                if not transport.is_closing():
                    transport.write(b"x")
        if not answer.received:
            return 0, {}, {}, time.monotonic() - started
        seconds = time.monotonic() - started
        try:
            await asyncio.wait_for(answer.closed.wait(), 15)
        except TimeoutError:
            pass  # a kept-alive connection: the answer is what arrived
        return (*parse_response(bytes(answer.received)), seconds)
    finally:
        transport.close()


def parse_response(raw: bytes) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of an HTTP/1.1 answer read to the connection's end."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(body)


def test_a_job_id_with_a_suffix_is_404_while_the_job_waits(http):
    """`<id>:payload` names the job's payload key in Redis: it must be no job (not a 503)."""
    submitted = http.post(
        "/v1/images/generations",
        json={"prompt": "x", "size": "64x64"},
        headers={"Prefer": "respond-async"},
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    for method in ("GET", "DELETE"):
        response = http.request(method, f"/v1/images/jobs/{job_id}:payload")
        assert response.status_code == 404, (method, response.text)
        assert response.json()["error"]["code"] == "job_not_found"
    assert http.get(f"/v1/images/jobs/{job_id}").status_code == 200


def test_trickled_uploads_are_refused_and_cut_while_health_answers(small_ingress):
    host, port = small_ingress.removeprefix("http://").split(":")

    async def attack():
        uploads = [
            asyncio.create_task(trickle_upload(host, int(port), for_s=30)) for _ in range(TRICKLERS)
        ]
        await asyncio.sleep(0.5)  # every ingress slot is now taken by a trickler
        checks = []
        async with httpx.AsyncClient(base_url=small_ingress, timeout=10) as http:
            for path in ("/health", "/v1/models", "/health"):
                started = time.monotonic()
                try:
                    response = await http.get(path)
                    checks.append((path, response.status_code, time.monotonic() - started))
                except httpx.TimeoutException:
                    checks.append((path, "timeout", time.monotonic() - started))
                await asyncio.sleep(0.5)
        return checks, await asyncio.gather(*uploads)

    checks, results = asyncio.run(attack())
    # /health is what a load balancer probes: it must answer while the uploads trickle.
    for path, status, seconds in checks:
        assert status == 200 and seconds < 3, (path, status, seconds)
    statuses = sorted(status for status, *_ in results)
    assert statuses == [408] * PER_CLIENT + [429] * (TRICKLERS - PER_CLIENT), statuses
    for status, headers, body, seconds in results:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if status == 429:
            assert error["code"] == "too_many_uploads" and headers["retry-after"]
            assert seconds < BODY_TIMEOUT_S  # refused at once, not at the deadline
        else:
            assert error["code"] == "body_timeout"
            assert BODY_TIMEOUT_S - 0.5 <= seconds < BODY_TIMEOUT_S + 4, seconds
