"""`serve run` as a user runs it, in its own Ray: the embedded Redis lives and dies with it.

A `redis-server` left running after `serve run` is stopped (its own session, PPID 1) broke the
next start without a word: another app's embedded Redis could not bind, every job answered a
misleading 503 and `/health` said 200. Here a foreign Redis holds the port first; the app must
refuse it (naming the port), keep serving synchronous requests, say so in `/health`, take the
port once it is free, and stop its own server when `serve run` gets SIGTERM.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import free_port, local_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def foreign_redis(tmp_path):
    """A Redis with a password of its own on a free port, like one another app left behind."""
    port = free_port()
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", "not-this-apps-password", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    client = redis.Redis(port=port, password="not-this-apps-password")
    wait_for(client.ping, 10, "the foreign redis-server")
    yield port, process
    process.kill()
    process.wait()


def test_serve_run_refuses_a_foreign_redis_and_stops_its_own_on_sigterm(
    tmp_path, tiny_cache_dir, foreign_redis
):
    redis_port, foreign = foreign_redis
    port, app_cache = free_port(), tmp_path / "app-cache"
    config = local_config(port, tiny_cache_dir, str(tmp_path / "images"), app_cache=str(app_cache))
    [app] = config["applications"]
    app["args"]["jobs"] = {**app["args"]["jobs"], "embedded_port": redis_port}
    app["args"]["models"][0].pop("lora", None)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, as on a fresh machine
    serve_run = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "serve-run.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    own_pid = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            health = wait_for(
                lambda: (r := http.get("/health")).status_code == 200 and r.json(), 240, "/health"
            )
            # 1. The foreign server is refused, by name, and the rest of the app serves.
            assert health["status"] == "degraded", health
            assert health["jobs"]["status"] == "unavailable"
            assert str(redis_port) in health["jobs"]["reason"], health
            body = {"prompt": "a fox", "size": "64x64", "quality": "low"}
            job = http.post(
                "/v1/images/generations", json=body, headers={"Prefer": "respond-async"}
            )
            assert job.status_code == 503, job.text
            error = job.json()["error"]
            assert error["code"] == "jobs_unavailable"
            assert str(redis_port) in error["message"] and "install" not in error["message"]
            assert http.post("/v1/images/generations", json=body).status_code == 200
            assert foreign.poll() is None, "the app stopped a server that is not its own"

            # 2. Once the port is free, the app's own server takes it and jobs work.
            foreign.kill()
            foreign.wait()
            wait_for(lambda: http.get("/health").json()["status"] == "ok", 60, "jobs to come up")
            job = http.post(
                "/v1/images/generations", json=body, headers={"Prefer": "respond-async"}
            )
            assert job.status_code == 202, job.text
            pid_file = app_cache / "redis" / "redis.pid"
            own_pid = int(wait_for(lambda: pid_file.read_text().strip(), 10, "the pid file"))
            assert alive(own_pid)

        # 3. SIGTERM to `serve run` (as a service manager stops it): its redis-server goes too.
        serve_run.send_signal(signal.SIGTERM)
        serve_run.wait(timeout=120)
        wait_for(lambda: not alive(own_pid), 60, f"redis-server {own_pid} to stop")
    finally:
        if serve_run.poll() is None:
            os.killpg(serve_run.pid, signal.SIGKILL)
            serve_run.wait()
        if own_pid and alive(own_pid):
            os.kill(own_pid, signal.SIGKILL)
