"""The operator path in the README: `ray start --head`, `serve deploy`, `serve status`, a request,
`serve shutdown`, then stopping the head, as subprocesses with Ray's token auth on.

It leaves any other Ray on this machine alone (a user's, serving): the head has its own temp dir
(its own session and `ray_current_cluster`), free ports for everything it binds, the app a free
HTTP port and embedded-Redis port (a copy of configs/local.yaml with only those changed), and the
`serve` commands reach it through RAY_DASHBOARD_ADDRESS. `ray stop` stops every Ray process of
the machine, so instead `ray start` runs in a process session of its own and the test ends only
that session's processes (and any naming its temp dir), as `ray stop` would: SIGTERM, then
SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.integration.conftest import free_ports

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# What a head node binds, each given a free port (`--port` is the GCS).
HEAD_PORTS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)
STOP_GRACE_S = 16  # `ray stop`'s default


def popen(*command: str, env: dict, **options) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def sh(*command: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return finish(popen(*command, env=env), timeout)


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def started_processes(session: int, temp_dir: str) -> list[psutil.Process]:
    """The processes of `ray start`'s session, and any other whose command line names the head's
    temp dir; never this process."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(OSError, psutil.Error):
            command_line = " ".join(process.info["cmdline"] or [])
            if (os.getsid(process.pid) == session or temp_dir in command_line) and running(process):
                found.append(process)
    return found


def stop_started(session: int, temp_dir: str) -> list[psutil.Process]:
    """End what `ray start` started, as `ray stop` would; returns what is still alive after."""

    def signal_and_wait(processes, kill: bool, timeout_s: float) -> list[psutil.Process]:
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill() if kill else process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive

    alive = signal_and_wait(started_processes(session, temp_dir), False, STOP_GRACE_S)
    signal_and_wait(alive, True, 10)
    return started_processes(session, temp_dir)


def test_ray_start_serve_deploy_status_shutdown(tiny_cache_dir, tmp_path):
    *head_ports, http_port, redis_port = free_ports(len(HEAD_PORTS) + 2)
    ports = dict(zip(HEAD_PORTS, head_ports, strict=True))
    # Short (like Ray's own /tmp/ray), so its socket paths stay within the unix-socket limit.
    temp_dir = tempfile.mkdtemp(prefix="ray-operator-", dir="/tmp")
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["jobs"] = {"embedded_port": redis_port}
    config_file = tmp_path / "local.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    url = f"http://127.0.0.1:{http_port}"
    # The README's environment: token auth (Ray 2.60's local default) for every command.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "SERVE_APP_CACHE": str(Path(tiny_cache_dir).parent),
        "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{ports['dashboard-port']}",
    }
    env.pop("RAY_ADDRESS", None)
    flags = [f"--{name}={port}" for name, port in ports.items()]
    head = popen(
        "ray", "start", "--head", "--num-cpus", "2", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", *flags,
        env=env, start_new_session=True,  # the session's id is this pid: what to stop
    )  # fmt: skip
    try:
        started = finish(head)
        assert started.returncode == 0, started.stderr[-2000:]
        deployed = sh("serve", "deploy", str(config_file), env=env)
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        deadline = time.monotonic() + 240
        while True:
            status = sh("serve", "status", env=env)
            assert status.returncode == 0, status.stderr[-2000:]
            if "status: RUNNING" in status.stdout and "DEPLOYING" not in status.stdout:
                break
            assert "DEPLOY_FAILED" not in status.stdout, status.stdout
            assert time.monotonic() < deadline, status.stdout
            time.sleep(2)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["flux-kontext-tiny"]
        image = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a lighthouse", "size": "64x64"},
            timeout=120,
        )
        assert image.status_code == 200 and image.json()["data"][0]["b64_json"]

        # Without the token, the CLI is refused (what a new user hits first).
        refused = sh("serve", "status", env={**env, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0

        shut = sh("serve", "shutdown", "-y", env=env)
        assert shut.returncode == 0, shut.stderr[-2000:]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/v1/models", timeout=5)
    finally:
        left = stop_started(head.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, [(p.pid, p.name()) for p in left]
