"""The embedded Redis's password never reaches what Ray logs or shows (Ray's session logs are
readable by anyone on the machine; with the password they could read and rewrite every job).

(The test config passes its URL-signing and webhook secrets in the app's `runtime_env`, which Ray
does show: production sets them as the nodes' environment, `cluster/rayservice.yaml`.)"""

import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ASYNC = {"Prefer": "respond-async"}


def session_files() -> list[Path]:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()]


def run_one_job(http) -> None:
    body = {"prompt": "a secret fox", "size": "64x64", "quality": "low", "seed": 5}
    answer = http.post("/v1/images/generations", json=body, headers=ASYNC)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/images/jobs/{job_id}").json())["status"] != "completed":
        assert job["status"] in ("queued", "in_progress"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_no_secret_is_in_rays_logs_or_its_status(http, app_cache, serve_client):
    from ray import serve

    password = (app_cache / "redis" / "password").read_text().strip()
    assert len(password) >= 32
    run_one_job(http)
    time.sleep(2)  # log lines reach their files
    shown = {
        "serve status": repr(serve.status()),
        "serve REST details": json.dumps(serve_client.get_serve_details(), default=str),
    }
    secrets = {"redis password": password}
    for where, text in shown.items():
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} is in {where}"
    files = session_files()
    assert any(path.suffix in (".log", ".out", ".err") for path in files), "no Ray logs found"
    for path in files:
        try:
            content = path.read_bytes()
        except OSError:  # a socket or a file that went away
            continue
        for name, secret in secrets.items():
            assert secret.encode() not in content, f"the {name} is in {path}"


def test_the_password_file_is_private(app_cache):
    path = app_cache / "redis" / "password"
    assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)
