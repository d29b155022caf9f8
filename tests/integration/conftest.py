"""One Ray instance and one running app per test session, deployed from configs/local.yaml.

The app is deployed the way `serve run configs/local.yaml` does it (serve_start with the file's
http_options, then deploy_apps with the parsed config), with test-only changes: a free port, fresh
model cache and image directories, a known URL-signing secret, small upload limits (so limit tests
send small bodies), a directory of LoRA adapters, a longer batch wait so that concurrent requests
visibly batch, and at most one model replica.
"""

import base64
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "images"
BATCH_WAIT_S = 0.3
URL_SECRET = "test-url-secret"
TEST_LIMITS = {
    "max_image_bytes": 1_000_000,
    "max_input_pixels": 4_000_000,
    "max_input_images": 4,
    "max_pixels_per_request": 2 * 1024 * 1024,  # bounds the fuzzer's valid requests
    "max_input_pixels_per_request": 16_000_000,
    "max_decoding_pixels": 32_000_000,  # two worst-case edits decode at once (memory test)
}


MAX_LOADED = 2  # adapter sets per replica: small, so the LRU test evicts
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-webhook-secret-32-bytes-long").decode()


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick); tests/cluster use it too."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on now (held together while the kernel picks)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


# Jobs: the embedded Redis on a free port; a consumer that died is noticed within seconds; a
# short queue so the backpressure test fills it; webhooks to the test's own receiver.
JOBS = {
    "embedded_port": free_port(),
    "visibility_timeout_s": 10,
    "max_queued": 8,
    "retry_backoff_max_s": 2,
    "webhooks": {"allow_private": True, "max_attempts": 3},
}


def local_config(
    port: int, cache_dir: str, images_dir: str, adapter_dir: str = "", app_cache: str = ""
) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    [app] = config["applications"]
    app["args"]["jobs"] = JOBS
    app["args"]["models"][0]["cache_dir"] = cache_dir
    if adapter_dir:
        app["args"]["models"][0]["lora"] = {"dirs": [adapter_dir], "max_loaded": MAX_LOADED}
    app["args"]["limits"] = TEST_LIMITS
    app["args"]["storage"] = {"local_dir": images_dir}
    env = {"SERVE_APP_URL_SECRET": URL_SECRET, "SERVE_APP_WEBHOOK_SECRET": WEBHOOK_SECRET}
    if app_cache:
        env["SERVE_APP_CACHE"] = app_cache  # the embedded Redis's data and password
    app["runtime_env"] = {"env_vars": env}
    for deployment in app["deployments"]:
        if "user_config" in deployment:
            deployment["user_config"]["batch_wait_timeout_s"] = BATCH_WAIT_S
            deployment["max_queued_requests"] = 4  # so the overload test needs few requests
            # One replica: batching and cancellation tests need their requests to meet there
            # (the overload test would otherwise scale the deployment to two).
            deployment["autoscaling_config"]["max_replicas"] = 1
    return config


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("url-images")


@pytest.fixture(scope="session")
def metrics_port() -> int:
    return free_port()


def wait_running(timeout_s: float = 180) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"app failed to deploy: {status.message}")
        if time.monotonic() > deadline:
            pytest.fail(f"app not running after {timeout_s}s: {status}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, tiny_cache_dir) -> Path:
    """LoRA adapters for the tiny model: `a`, `b` (diffusers/PEFT format), `k` (kohya) and
    `corrupt` (not a safetensors file)."""
    from tests.conftest import write_test_adapters

    path = tmp_path_factory.mktemp("adapters")
    write_test_adapters(path, tiny_cache_dir)
    return path


@pytest.fixture(scope="session")
def app_cache(tmp_path_factory) -> Path:
    """The app's cache directory (`SERVE_APP_CACHE`): the embedded Redis keeps its data and
    password here; the server is stopped at the end even if the app could not stop it."""
    path = tmp_path_factory.mktemp("app-cache")
    yield path
    try:
        os.kill(int((path / "redis" / "redis.pid").read_text()), signal.SIGKILL)
    except (OSError, ValueError):
        pass


def redis_client(app_cache: Path):
    import redis

    password = (app_cache / "redis" / "password").read_text().strip()
    return redis.Redis(port=JOBS["embedded_port"], password=password, decode_responses=True)


@pytest.fixture(scope="session")
def serve_config(tiny_cache_dir, images_dir, adapter_dir, app_cache) -> dict:
    """configs/local.yaml with the test-only changes (see the module docstring)."""
    return local_config(
        free_port(), tiny_cache_dir, str(images_dir), str(adapter_dir), str(app_cache)
    )


@pytest.fixture(scope="session")
def serve_client(serve_config, metrics_port):
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_config)
    ray.init(
        address="local",  # a Ray of its own, even where `ray start` runs one on this machine
        num_cpus=2,
        namespace=SERVE_NAMESPACE,
        include_dashboard=False,
        _metrics_export_port=metrics_port,  # Prometheus text format, as an operator scrapes it
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        yield serve_api.serve_start(
            http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
        )
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def redeploy(serve_client):
    """Deploy a serve config (as `serve deploy` would) and wait until the app runs."""
    from ray.serve.schema import ServeDeploySchema

    def deploy(config: dict, timeout_s: float = 180) -> None:
        serve_client.deploy_apps(ServeDeploySchema.model_validate(config))
        time.sleep(1)  # let the controller pick up the new target before polling its status
        wait_running(timeout_s)

    return deploy


@pytest.fixture(scope="session")
def base_url(serve_config, redeploy) -> str:
    redeploy(serve_config)
    return f"http://127.0.0.1:{serve_config['http_options']['port']}"


@pytest.fixture(scope="session")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http_client:
        yield http_client
