"""Sequence-parallel replicas through the real app: one request across 2 ranks (gloo on CPU).

The session app gets a second model, the tiny model with `parallel: {ulysses: 2}`: its replica
is rank 0 and starts one `RankWorker` actor in its placement group. Every answer must equal the
1-rank model's for the same request within batched-rounding tolerance (`assert_batch_equivalent`:
<= 2 per channel on < 0.1% of values; measured: max 1 on <= 0.008%, docs/performance.md),
through the SDK, for every
request kind; streaming, cancellation, LoRA switches and jobs work as on one rank; killing a rank
under load, or hanging one, answers every request (200, or 503 with Retry-After), the replica is
replaced and serves again, and no worker is left behind.
"""

import copy
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_batch_equivalent, decode_base64_image, pixels
from tests.integration.conftest import APP_NAME, BATCH_WAIT_S
from tests.integration.test_edits import center_mask, noise_png
from tests.integration.test_jobs import ASYNC, poll
from tests.integration.test_streaming import timed_post

SP = "flux-kontext-tiny-sp"
BASE = "flux-kontext-tiny"
SP_DEPLOYMENT = "ImageModel-" + SP


@pytest.fixture(scope="module")
def sp_app(base_url, serve_config, redeploy):
    """The session app (deployed first: `base_url`) serving a second, 2-rank model too
    (restored afterwards)."""
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    model = copy.deepcopy(app["args"]["models"][0])
    model["id"] = SP
    model["parallel"] = {"ulysses": 2, "collective_timeout_s": 20}
    app["args"]["models"].append(model)
    app["deployments"].append(
        {
            "name": SP_DEPLOYMENT,
            # Beside the session's model on a 2-CPU Ray: tiny CPU shares, one bundle per rank.
            "ray_actor_options": {"num_cpus": 0.01},
            "placement_group_bundles": [{"CPU": 0.01}, {"CPU": 0.01}],
            "user_config": {"max_batch_images": 8, "batch_wait_timeout_s": BATCH_WAIT_S},
            "health_check_period_s": 2,
            "max_ongoing_requests": 16,
        }
    )
    redeploy(config)
    try:
        yield config
    finally:
        redeploy(serve_config)


def workers() -> list[dict]:
    import ray

    from serve_app.parallel import WORKER_PREFIX

    return [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(WORKER_PREFIX)
    ]


def generate(client, model, **fields):
    extra = {"seed": 5, "num_inference_steps": 4, **fields.pop("extra", {})}
    return client.images.generate(model=model, prompt="a lighthouse", extra_body=extra, **fields)


def assert_same_images(sp_answer, base_answer) -> None:
    assert len(sp_answer.data) == len(base_answer.data)
    for ours, theirs in zip(sp_answer.data, base_answer.data, strict=True):
        assert_batch_equivalent(pixels(ours.b64_json), pixels(theirs.b64_json))


def test_the_replica_runs_one_worker_rank(sp_app):
    from ray import serve

    deployment = serve.status().applications[APP_NAME].deployments[SP_DEPLOYMENT]
    assert deployment.status == "HEALTHY"
    assert len(workers()) == 1


def test_text_to_image_equals_one_rank(sp_app, client):
    for size, n in (("64x64", 2), ("128x96", 1)):
        assert_same_images(
            generate(client, SP, size=size, n=n), generate(client, BASE, size=size, n=n)
        )
    # Each input still changes the output on the 2-rank model.
    one = pixels(generate(client, SP, size="64x64").data[0].b64_json)
    other = pixels(generate(client, SP, size="64x64", extra={"seed": 6}).data[0].b64_json)
    assert np.abs(one - other).max() > 10


def edit(client, model, images, mask=None, size="64x64"):
    files = [(f"{k}.png", io.BytesIO(data), "image/png") for k, data in enumerate(images)]
    extra = {"mask": ("mask.png", io.BytesIO(mask), "image/png")} if mask else {}  # SDK field
    return client.images.edit(
        model=model,
        image=files if len(files) > 1 else files[0],
        prompt="make it blue",
        size=size,
        extra_body={"seed": 9, "num_inference_steps": 4},
        **extra,
    )


def test_edits_equal_one_rank(sp_app, client):
    one = [noise_png(128, 128, seed=1)]
    two = [noise_png(64, 128, seed=2), noise_png(64, 128, seed=3)]  # stitched: a square canvas
    mask, _ = center_mask(128, 128)
    for images, mask_png, size in ((one, None, "64x64"), (two, None, "64x96"), (one, mask, None)):
        size = size or "128x128"
        assert_same_images(
            edit(client, SP, images, mask_png, size), edit(client, BASE, images, mask_png, size)
        )


def test_four_concurrent_requests_of_mixed_sizes_equal_one_rank(sp_app, client):
    sizes = ["64x64", "64x96", "96x64", "128x128"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda size: generate(client, SP, size=size, n=2), sizes))
    for size, answer in zip(sizes, answers, strict=True):
        assert_same_images(answer, generate(client, BASE, size=size, n=2))


def test_concurrent_requests_share_one_call_on_the_parallel_replica(sp_app, base_url):
    body = {"model": SP, "prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 4}

    def post(seed):
        return httpx.post(
            f"{base_url}/v1/images/generations", json={**body, "seed": seed}, timeout=60
        )

    alone = post(2)
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(post, (1, 2))
    assert first.headers["x-batch-images"] == second.headers["x-batch-images"] == "2"
    assert_batch_equivalent(
        pixels(second.json()["data"][0]["b64_json"]), pixels(alone.json()["data"][0]["b64_json"])
    )


def test_a_size_that_does_not_split_across_the_ranks_is_a_400_naming_size(sp_app, http):
    body = {"model": SP, "prompt": "x", "size": "80x112", "num_inference_steps": 2}
    answer = http.post("/v1/images/generations", json=body)  # 5 x 7 = 35 image tokens
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "size" and "35 image tokens" in error["message"]
    # The 1-rank model serves it, and the 2-rank one still serves a size that splits.
    assert http.post("/v1/images/generations", json={**body, "model": BASE}).status_code == 200
    assert http.post("/v1/images/generations", json={**body, "size": "80x96"}).status_code == 200


def test_streaming_previews_then_the_same_image(sp_app, client):
    stream = client.images.generate(
        model=SP,
        prompt="a lighthouse",
        size="64x64",
        stream=True,
        partial_images=2,
        extra_body={"seed": 5, "num_inference_steps": 4},
    )
    events = list(stream)
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    [completed] = [e for e in events if e.type == "image_generation.completed"]
    assert [p.partial_image_index for p in partials] == [0, 1]
    assert partials[0].b64_json != completed.b64_json
    plain = generate(client, BASE, size="64x64")
    assert_batch_equivalent(pixels(completed.b64_json), pixels(plain.data[0].b64_json))


def test_a_cancelled_request_stops_every_rank_and_the_next_is_served_at_once(sp_app, base_url):
    small = {"model": SP, "prompt": "x", "size": "64x64", "num_inference_steps": 2}
    long_body = {**small, "size": "1024x1024", "num_inference_steps": 100}
    _, per_4_steps = timed_post(base_url, {**long_body, "num_inference_steps": 4}, 60)
    dropped, _ = timed_post(base_url, long_body, timeout=1.5)
    assert dropped is None, "the long request should still be running when the client leaves"
    answer, elapsed = timed_post(base_url, small, 60)
    assert answer.status_code == 200, answer.text
    # ~25 x per_4_steps of work was left on both ranks; neither kept running it.
    assert elapsed < max(2.0, 0.25 * 25 * per_4_steps), (elapsed, per_4_steps)
    assert len(workers()) == 1  # no rank was lost in the stop


def test_a_lora_switch_between_requests_reaches_both_ranks(sp_app, client):
    for lora in ([{"name": "a"}], None, [{"name": "b", "scale": 0.7}], [{"name": "a"}]):
        extra = {"lora": lora} if lora else {}
        assert_same_images(
            generate(client, SP, size="64x64", extra=extra),
            generate(client, BASE, size="64x64", extra=extra),
        )


def test_an_async_job_runs_on_the_parallel_replica(sp_app, http, client):
    body = {"model": SP, "prompt": "a red fox", "size": "64x64", "seed": 11}
    answer = http.post(
        "/v1/images/generations", json={**body, "num_inference_steps": 4}, headers=ASYNC
    )
    assert answer.status_code == 202, answer.text
    job = poll(http, answer.json()["id"])
    assert job["status"] == "completed", job
    sync = client.images.generate(
        model=SP,
        prompt="a red fox",
        size="64x64",
        extra_body={"seed": 11, "num_inference_steps": 4},
    )
    assert_batch_equivalent(
        pixels(job["result"]["data"][0]["b64_json"]), pixels(sync.data[0].b64_json)
    )


def test_the_benchmark_times_one_and_two_ranks_and_the_step_agreement(serve_client, tmp_path):
    import argparse

    from serve_app.bench import parallel

    args = argparse.Namespace(
        ranks=2, size="128x128", steps=2, source="tiny", device="cpu", repeats=2, out=tmp_path
    )
    result = parallel.measure(args)
    one, two = result["runs"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert len(one["seconds"]) == len(two["seconds"]) == 2
    assert two["agreement_ms_per_step"] > 0 and two["idle_broadcast_ms"] > 0
    assert result["speedup"] == one["median_s"] / two["median_s"]
    assert f"| 2 | {two['threads_per_rank']} |" in parallel.markdown(result)


@pytest.mark.parametrize(
    "speed",
    [{"first_block_cache_threshold": 0.3}, {"first_block_cache_threshold": 0.3, "compile": True}],
    ids=["cache", "compile+cache"],
)
def test_speed_switches_on_two_ranks_equal_one_rank_with_the_same_switches(
    serve_client, tiny_cache_dir, speed
):
    """The first-block cache decides per step whether to skip the remaining blocks; on a
    shard each rank would decide for itself and the ranks could part ways (one waiting in a
    collective the other skipped). With the decision taken on the whole sequence the 2-rank
    images equal a 1-rank engine's with the same cache, and differ from uncached ones."""
    import ray

    from serve_app.config import ModelConfig
    from serve_app.contract import ModelRequest
    from serve_app.engine import ImageEngine

    base = {"id": "t", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup": False}
    canvas = Image.open(io.BytesIO(noise_png(512, 512, seed=4))).convert("RGB")
    requests = [
        [ModelRequest("t2i", "a lighthouse", 64, 64, 8, 2.5, (1, 2))],
        [ModelRequest("edit", "make it blue", 64, 64, 8, 2.5, (3,), conditioning=(canvas,))],
    ]

    def two_ranks(config: dict) -> tuple:
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        from serve_app.parallel import ParallelEngine

        engine = ParallelEngine(ModelConfig.model_validate(config))
        engine.load()
        [leader] = [
            module._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
            for module in engine.pipe.transformer.modules()
            if getattr(module, "_diffusers_hook", None) is not None
            and module._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) is not None
        ]
        decide, skipped = leader._should_compute_remaining_blocks, []

        def counting(residual):
            compute = decide(residual)
            skipped.append(not compute)
            return compute

        leader._should_compute_remaining_blocks = counting
        try:
            images = [[np.asarray(image) for image in engine.generate(r)[0]] for r in requests]
            return images, sum(skipped)
        finally:
            engine.close()

    parallel = {"ulysses": 2, "collective_timeout_s": 30}
    config = {**base, "speed": speed, "parallel": parallel}
    ours, skipped = ray.get(ray.remote(num_cpus=0)(two_ranks).remote(config))
    assert skipped > 0  # the cache skipped steps (agreed by both ranks: no hang)
    cached = ImageEngine(ModelConfig(**base, speed={"first_block_cache_threshold": 0.3}))
    cached.load()
    uncached = ImageEngine(ModelConfig(**base))
    uncached.load()
    for images, request in zip(ours, requests, strict=True):
        expected = [np.asarray(image) for image in cached.generate(request)[0]]
        plain = [np.asarray(image) for image in uncached.generate(request)[0]]
        for mine, theirs, without in zip(images, expected, plain, strict=True):
            assert_batch_equivalent(mine.astype(np.int16), theirs.astype(np.int16))
            assert not np.array_equal(mine, without)  # the skipped steps show


def wait_replaced(base_url, old_name: str, timeout_s: float = 180) -> None:
    """Until a new replica's worker (not `old_name`) is up and the model answers 200."""
    deadline = time.monotonic() + timeout_s
    small = {"model": SP, "prompt": "x", "size": "64x64", "num_inference_steps": 2}
    while True:
        names = [actor["name"] for actor in workers()]
        if names and old_name not in names:
            answer = httpx.post(f"{base_url}/v1/images/generations", json=small, timeout=60)
            if answer.status_code == 200:
                assert decode_base64_image(answer.json()["data"][0]["b64_json"]).size == (64, 64)
                return
        assert time.monotonic() < deadline, f"not replaced: workers {names}"
        time.sleep(1)


def test_a_hung_rank_times_out_into_a_503_and_the_replica_is_replaced(sp_app, base_url):
    """A worker that stops responding (SIGSTOP: alive, but never joins a collective): the
    call fails after `collective_timeout_s` (20 s here) with a 503, not a hang; the health
    check's ping fails too, and the stopped process is killed with its replica."""
    import os
    import signal

    import ray

    [old] = workers()
    pid = ray.get(ray.get_actor(old["name"], namespace=old["namespace"]).pid.remote())
    os.kill(pid, signal.SIGSTOP)
    body = {"model": SP, "prompt": "x", "size": "64x64", "num_inference_steps": 2}
    started = time.monotonic()
    answer = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=120)
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"]
    assert time.monotonic() - started < 60
    wait_replaced(base_url, old["name"])
    deadline = time.monotonic() + 30
    while True:  # the stopped process is gone, not left holding its device
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, f"worker process {pid} still exists"
        time.sleep(0.5)
    assert len(workers()) == 1


def test_killing_a_rank_under_load_answers_everything_and_the_replica_is_replaced(sp_app, base_url):
    import ray

    [old] = workers()
    body = {"model": SP, "prompt": "x", "size": "256x256", "num_inference_steps": 30}

    def post(seed):
        return httpx.post(
            f"{base_url}/v1/images/generations", json={**body, "seed": seed}, timeout=120
        )

    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(post, seed) for seed in range(6)]
        time.sleep(1.5)
        ray.kill(ray.get_actor(old["name"], namespace=old["namespace"]), no_restart=True)
        results = [answer.result() for answer in answers]
    statuses = [result.status_code for result in results]
    assert set(statuses) <= {200, 503}, [(r.status_code, r.text[:200]) for r in results]
    assert 503 in statuses  # the call running on the lost rank
    for result in results:
        if result.status_code == 503:
            assert result.headers["retry-after"]
            assert result.json()["error"]["code"] == "model_unavailable"
    # Replaced: a new replica with a new worker serves again; the old worker is gone.
    wait_replaced(base_url, old["name"])
    assert len(workers()) == 1, workers()  # one per live replica, none leaked
