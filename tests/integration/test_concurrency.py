"""Concurrent requests get the same images as the same requests one at a time.

Statistical, through the stock SDK: many seeded requests (with and without a LoRA adapter) run
concurrently while other clients send prompts that only get token-counted (too long: a 400 from
the model's check), which is what raced the pipeline's tokenizer. Each image must equal its
serial twin within the documented batched-rounding tolerance (`assert_batch_equivalent`).
"""

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import assert_batch_equivalent, pixels

pytestmark = pytest.mark.integration

MODEL = "flux-kontext-tiny"
REQUESTS = 48
# Long texts widen the window in which two tokenizations overlap: prompts near the 512-token
# context (the tiny tokenizer spends about one token per character), counted prompts near the
# 20,000-character limit.
COUNTED = "a lighthouse at dawn, " * 900


def request(i: int) -> dict:
    body = {
        "prompt": f"a lighthouse number {i} " + "at dawn over a grey sea " * (12 + i % 7),
        "size": "64x64",
        "extra_body": {"seed": 1000 + i, "num_inference_steps": 2},
    }
    if i % 4 == 3:
        body["extra_body"]["lora"] = [{"name": "a", "scale": 0.5 + (i % 3) / 4}]
    return body


def generate(sdk: openai.OpenAI, body: dict):
    result = sdk.images.generate(model=MODEL, **body)
    [image] = result.data
    return pixels(image.b64_json)


def test_concurrent_requests_equal_their_serial_twins_while_prompts_are_counted(base_url):
    # The SDK's own retries absorb 429s from the small test queue.
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=8, timeout=300)
    bodies = [request(i) for i in range(REQUESTS)]
    serial = [generate(sdk, body) for body in bodies]

    stop = threading.Event()
    counted = []

    def count_prompts() -> None:
        """Too-long prompts: only the model's token check runs (bounded loop)."""
        too_long = {"prompt": COUNTED, "size": "64x64", "model": MODEL}
        with httpx.Client(base_url=base_url, timeout=60) as http:
            for _ in range(2000):
                if stop.is_set():
                    return
                response = http.post("/v1/images/generations", json=too_long)
                counted.append(response.status_code)

    counters = [threading.Thread(target=count_prompts) for _ in range(3)]
    for thread in counters:
        thread.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            concurrent = list(pool.map(lambda body: generate(sdk, body), bodies))
    finally:
        stop.set()
        for thread in counters:
            thread.join()
    assert counted.count(400) > 20, f"the token check barely ran: {counted[:20]}"
    assert set(counted) <= {400, 429}, set(counted)
    differing = sum(
        bool((together != alone).any()) for together, alone in zip(concurrent, serial, strict=True)
    )
    print(f"{len(counted)} prompts counted; {differing}/{REQUESTS} images differ from alone")
    for i, (together, alone) in enumerate(zip(concurrent, serial, strict=True)):
        try:
            assert_batch_equivalent(together, alone)
        except AssertionError as exc:
            raise AssertionError(f"request {i} ({bodies[i]}) differs: {exc}") from None


def test_the_same_request_alone_twice_is_byte_identical_after_concurrency(base_url):
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=8, timeout=300)
    body = request(3)  # with an adapter
    first = sdk.images.generate(model=MODEL, **body).data[0].b64_json
    second = sdk.images.generate(model=MODEL, **body).data[0].b64_json
    assert base64.b64decode(first) == base64.b64decode(second)
