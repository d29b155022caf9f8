"""The operator path in the README, exactly: `ray start --head`, `serve deploy`, `serve status`,
a request, `serve shutdown`, `ray stop`, as subprocesses with Ray's token auth on.

Runs after test_multinode (whose cluster is gone by then): `ray stop` stops every Ray process
of this machine, so nothing else may run Ray at the same time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def sh(*command: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_ray_start_serve_deploy_status_shutdown(tiny_cache_dir):
    import ray

    assert not ray.is_initialized(), "ray stop would stop this process's Ray too"
    # The README's environment: token auth (Ray 2.60's local default) for every command.
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "SERVE_APP_CACHE": str(Path(tiny_cache_dir).parent),
    }
    started = sh("ray", "start", "--head", "--num-cpus", "2", "--disable-usage-stats", env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        deployed = sh("serve", "deploy", "configs/local.yaml", env=env)
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
        models = httpx.get("http://127.0.0.1:8000/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["flux-kontext-tiny"]
        image = httpx.post(
            "http://127.0.0.1:8000/v1/images/generations",
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
            httpx.get("http://127.0.0.1:8000/v1/models", timeout=5)
    finally:
        stopped = sh("ray", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
