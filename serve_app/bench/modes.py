"""Ray Serve's ingress modes side by side: `python -m serve_app.bench modes`.

Per mode (default, `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, `RAY_SERVE_ENABLE_HA_PROXY=1`, or both),
back to back:
1. `python -m serve_app.bench report` in a fresh subprocess whose environment carries the mode's
   variables and `RAY_ADDRESS=local`, so the report's `ray.init()` starts a Ray of its own and
   every Ray process (controller, proxy or HAProxy manager, replicas) reads the mode at import;
2. unless `--no-checks`, the app under `serve run` (configs/local.yaml, one model replica, a free
   port) with the same environment: one streamed generation through the `openai` SDK must give
   its partial images before the final image, and a request whose client leaves must free the
   replica within a fraction of its run time (cancellation on disconnect).
Then `modes.json` and `modes.md` in `--out` compare the modes: serving efficiency, images/s at
saturation, p50 at concurrency 1 and the latency added over the in-process call.

The variables are read once per process when `ray.serve._private.constants` is imported, so they
must be in the environment of whatever starts Ray (`ray start` on every node, or the driver that
calls `ray.init`); a deployment's `runtime_env.env_vars` reaches its replicas only, never the
controller or the proxy.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# What each mode adds to the environment of every Ray process.
MODES: dict[str, dict[str, str]] = {
    "default": {},
    "throughput": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "both": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
# Removed from the inherited environment first, so that one mode's switches (or the ones they
# imply, see ray/serve/_private/constants.py) never leak into another's measurement.
MODE_VARIABLES = (
    "RAY_SERVE_THROUGHPUT_OPTIMIZED",
    "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT",
    "RAY_SERVE_PROXY_USE_GRPC",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP",
)
# Direct ingress (both modes above) holds a stopping ingress replica open this long so a load
# balancer can deregister it (30 s by default): every redeploy and shutdown would wait for it.
# One machine has no load balancer to wait for; serving itself is unaffected.
DRAIN_VARIABLE = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
BENCH_DRAIN_S = "1"
# HAProxy's stats and metrics listeners have fixed default ports (8404, 9101): free ones here so
# that two runs on one machine do not collide.
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")

# Options passed through to `bench report` when given (defaults are report's own).
REPORT_OPTIONS = (
    "source",
    "device",
    "size",
    "steps",
    "batch_sizes",
    "concurrency",
    "max_batch_images",
    "batch_wait",
    "seconds",
    "repeat",
    "torch_threads",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modes",
        default="default,throughput,haproxy",
        help=f"comma-separated, from {', '.join(MODES)}",
    )
    parser.add_argument("--out", default="results/modes", help="modes.json/.md; <mode>/ each")
    parser.add_argument("--source", default=None, help="passed to `bench report`")
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-sizes", default=None)
    parser.add_argument("--concurrency", default=None)
    parser.add_argument("--max-batch-images", type=int, default=None)
    parser.add_argument("--batch-wait", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument(
        "--report-args",
        default="",
        help='more `bench report` arguments, one string: --report-args="--access-log"',
    )
    parser.add_argument("--no-report", action="store_true", help="functional checks only")
    parser.add_argument("--no-checks", action="store_true", help="skip the functional checks")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per report subprocess")


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"unknown modes {unknown} (choose from {', '.join(MODES)})")
    return modes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mode_env(mode: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess that starts its own Ray in `mode`."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if k not in MODE_VARIABLES}
    env.update(MODES[mode])
    env["RAY_ADDRESS"] = "local"  # a Ray of its own even where `ray start` runs one here
    env.setdefault(DRAIN_VARIABLE, BENCH_DRAIN_S)
    if "RAY_SERVE_ENABLE_HA_PROXY" in MODES[mode]:
        for name in HAPROXY_PORT_VARIABLES:
            env.setdefault(name, str(free_port()))
    return env


def report_command(args: argparse.Namespace, out: Path) -> list[str]:
    command = [sys.executable, "-m", "serve_app.bench", "report"]
    for name in REPORT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    command += shlex.split(args.report_args or "")
    return [*command, "--out", str(out)]


# --- the comparison -----------------------------------------------------------------------


def summarize(mode: str, report: dict) -> dict:
    """One mode's row from its bench.json."""
    batched = [row for row in report["serve"] if row["config"] == "batched"]
    saturation = max(batched, key=lambda row: row["images_per_s"])
    single = next((row for row in batched if row["concurrency"] == 1), None)
    ratios = report["ratios"]
    baseline = {row["batch"]: row for row in report["in_process"]}
    max_batch = report["settings"].get("max_batch_images")
    same = baseline.get(max_batch) or baseline[max(baseline)]
    errors = sum(sum(row["errors"].values()) for row in report["serve"])
    return {
        "mode": mode,
        "env": MODES[mode],
        "serving_efficiency": ratios["serving_efficiency"],
        "saturation_images_per_s": saturation["images_per_s"],
        "saturation_concurrency": saturation["concurrency"],
        "in_process_images_per_s": same["images_per_s"],
        "in_process_batch": same["batch"],
        "p50_c1_ms": round(1000 * single["p50_s"], 1) if single else None,
        "added_latency_c1_ms": ratios.get("added_latency_c1_ms"),
        "e2e_batching_gain": ratios.get("e2e_batching_gain"),
        "errors": errors,
    }


def compare(rows: list[dict]) -> list[dict]:
    """Each row with its throughput and latency relative to the `default` row (if measured)."""
    reference = next((r for r in rows if r["mode"] == "default" and "error" not in r), None)
    result = []
    for row in rows:
        row = dict(row)
        if reference and row["mode"] != "default" and "error" not in row:
            row["images_per_s_vs_default"] = round(
                row["saturation_images_per_s"] / reference["saturation_images_per_s"], 3
            )
            if row["p50_c1_ms"] is not None and reference["p50_c1_ms"] is not None:
                row["p50_c1_ms_vs_default"] = round(row["p50_c1_ms"] - reference["p50_c1_ms"], 1)
        result.append(row)
    return result


def _cell(value: Any) -> str:
    return "—" if value is None else str(value)


def _check_cell(check: dict | None) -> str:
    if not check:
        return "not run"
    return ("ok" if check["ok"] else "FAIL") + (f" ({check['detail']})" if check["detail"] else "")


def markdown(summary: dict) -> str:
    lines = [
        "# Ray Serve ingress modes",
        "",
        f"Settings: `{summary['report_command']}` per mode, back to back; {summary['machine']}.",
        "",
        "| mode | env | serving efficiency | img/s at saturation (c) | vs default "
        "| p50 c=1 ms | added c=1 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["modes"]:
        if "error" in row:
            lines.append(f"| {row['mode']} | {_env_text(row)} | {row['error']} | | | | | |")
            continue
        lines.append(
            f"| {row['mode']} | {_env_text(row)} | {row['serving_efficiency']} "
            f"| {row['saturation_images_per_s']} ({row['saturation_concurrency']}) "
            f"| {_cell(row.get('images_per_s_vs_default'))} | {_cell(row['p50_c1_ms'])} "
            f"| {_cell(row['added_latency_c1_ms'])} | {row['errors']} |"
        )
    lines += [
        "",
        "Functional checks (`serve run` under the mode's environment):",
        "",
        "| mode | streaming previews | cancellation on disconnect |",
        "|---|---|---|",
    ]
    for mode, checks in summary["checks"].items():
        lines.append(
            f"| {mode} | {_check_cell(checks.get('streaming'))} "
            f"| {_check_cell(checks.get('cancellation'))} |"
        )
    return "\n".join(lines) + "\n"


def _env_text(row: dict) -> str:
    return " ".join(f"`{k}={v}`" for k, v in row["env"].items()) or "(none)"


# --- the functional checks ------------------------------------------------------------------


def check_config(port: int, cache_dir: str | None = None) -> dict:
    """configs/local.yaml on `port` with one model replica (the cancellation check needs its
    requests to meet there) and no LoRA directory."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    [app] = config["applications"]
    model = app["args"]["models"][0]
    model.pop("lora", None)
    if cache_dir:
        model["cache_dir"] = cache_dir
    for deployment in app["deployments"]:
        if "autoscaling_config" in deployment:
            deployment["autoscaling_config"]["max_replicas"] = 1
    return config


@contextlib.contextmanager
def serve_running(
    mode: str, cache_dir: str | None = None, log: Path | None = None
) -> Iterator[str]:
    """`serve run` of check_config() in `mode`'s environment; yields the base URL."""
    import httpx
    import yaml

    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"serve-{mode}-") as tmp:
        config_path = Path(tmp) / "serve.yaml"
        config_path.write_text(yaml.safe_dump(check_config(port, cache_dir)))
        log_path = log or Path(tmp) / "serve.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        serve_cli = Path(sys.executable).with_name("serve")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [str(serve_cli), "run", str(config_path)],
                cwd=ROOT,
                env=mode_env(mode),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its Ray processes in a group of their own to stop
            )
            try:
                url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 300
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"serve run exited ({process.returncode}): {log_path}")
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the app did not become healthy: {log_path}")
                    time.sleep(0.5)
                yield url
            finally:
                _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C as a user would (serve run shuts Serve and its Ray down), then the group."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the group this module started, nothing else
    process.wait()


def check_streaming(url: str) -> dict:
    """A streamed generation through the openai SDK: 2 partial images, then the final one, each
    a decodable image of the requested size, the first partial well before the final one."""
    from openai import OpenAI
    from PIL import Image

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    started = time.monotonic()
    arrivals = []
    stream = client.images.generate(
        prompt="a lighthouse",
        size="256x256",
        stream=True,
        partial_images=2,
        extra_body={"seed": 3, "num_inference_steps": 16},
    )
    for event in stream:
        arrivals.append((time.monotonic() - started, event))
    types = [event.type for _, event in arrivals]
    expected = ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    if types != expected:
        return {"ok": False, "detail": f"events {types}"}
    sizes = {Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size for _, e in arrivals}
    if sizes != {(256, 256)}:
        return {"ok": False, "detail": f"image sizes {sizes}"}
    first, last = arrivals[0][0], arrivals[-1][0]
    # A buffering ingress would deliver every event at the end; previews must arrive earlier
    # (unless the whole call is too quick to tell, as on a fast GPU).
    streamed = last - first > 0.1 * last or last < 0.25
    detail = f"first partial {first:.2f} s, final {last:.2f} s"
    if last < 0.25:
        detail += " (too quick to tell buffering)"
    return {"ok": streamed, "detail": detail if streamed else f"buffered: {detail}"}


def _timed_post(url: str, body: dict, timeout: float) -> tuple[int | None, float]:
    import httpx

    started = time.monotonic()
    try:
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)
        return response.status_code, time.monotonic() - started
    except httpx.TimeoutException:
        return None, time.monotonic() - started


def check_cancellation(url: str) -> dict:
    """A long request whose client leaves after 1.5 s must not hold the (only) replica: a small
    request sent right after completes in a fraction of the long one's remaining time."""
    small = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
    status, per_4_steps = _timed_post(
        url, {**small, "size": "1024x1024", "num_inference_steps": 4}, 120
    )
    if status != 200:
        return {"ok": False, "detail": f"calibration request: {status}"}
    expected_long_s = per_4_steps * 25
    dropped, _ = _timed_post(url, {**small, "size": "1024x1024", "num_inference_steps": 100}, 1.5)
    if dropped is not None:
        return {"ok": False, "detail": "the long request ended before the client left"}
    limit = max(2.0, 0.25 * expected_long_s)
    status, elapsed = _timed_post(url, small, 2 * limit)  # fail fast when the replica is held
    ok = status == 200 and elapsed < limit
    detail = f"next request {elapsed:.2f} s (limit {limit:.1f} s, long ~{expected_long_s:.0f} s)"
    return {"ok": ok, "detail": detail if status == 200 else f"status {status}; {detail}"}


def run_checks(mode: str, cache_dir: str | None = None, log: Path | None = None) -> dict:
    """Both checks on one `serve run` of the app in `mode`; a failure to start fails both."""
    try:
        with serve_running(mode, cache_dir, log) as url:
            result = {}
            for name, check in (
                ("streaming", check_streaming),
                ("cancellation", check_cancellation),
            ):
                try:
                    result[name] = check(url)
                except Exception as error:  # noqa: BLE001 - recorded as the check's failure
                    result[name] = {"ok": False, "detail": f"{type(error).__name__}: {error}"}
            return result
    except Exception as error:  # noqa: BLE001
        failed = {"ok": False, "detail": f"app did not start: {error}"}
        return {"streaming": failed, "cancellation": failed}


# --- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from serve_app.bench.machine import describe, device_label

    modes = parse_modes(args.modes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    checks: dict[str, dict] = {}
    for mode in modes:
        mode_dir = out / mode
        mode_dir.mkdir(parents=True, exist_ok=True)
        if not args.no_report:
            command = report_command(args, mode_dir)
            print(
                f"[{mode}] {' '.join(f'{k}={v}' for k, v in MODES[mode].items())} "
                f"{shlex.join(command[1:])}",
                flush=True,
            )
            with open(mode_dir / "report.log", "wb") as log:
                try:
                    done = subprocess.run(
                        command, cwd=ROOT, env=mode_env(mode), stdout=log,
                        stderr=subprocess.STDOUT, timeout=args.timeout,
                    )  # fmt: skip
                    code: int | str = done.returncode
                except subprocess.TimeoutExpired:
                    code = "timeout"
            report_path = mode_dir / "bench.json"
            if code == 0 and report_path.exists():
                try:
                    rows.append(summarize(mode, json.loads(report_path.read_text())))
                except (KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
                    # a report cut short (levels skipped): the other modes still count
                    rows.append({"mode": mode, "env": MODES[mode], "error": f"summary: {exc!r}"})
                print(f"[{mode}] {rows[-1]}", flush=True)
            else:
                rows.append({"mode": mode, "env": MODES[mode], "error": f"report: {code}"})
                print(f"[{mode}] report failed ({code}): {mode_dir / 'report.log'}", flush=True)
        if not args.no_checks:
            checks[mode] = run_checks(mode, log=mode_dir / "serve-run.log")
            print(f"[{mode}] checks {checks[mode]}", flush=True)
    summary = {
        "machine": device_label(describe()),
        "report_command": shlex.join(report_command(args, out / "<mode>")[1:]),
        "modes": compare(rows),
        "checks": checks,
    }
    (out / "modes.json").write_text(json.dumps(summary, indent=2))
    (out / "modes.md").write_text(markdown(summary))
    print(markdown(summary))
    print(f"wrote {out}/modes.json, modes.md")
    return summary
