"""`bench modes`: each mode's environment, the report command and the comparison (no Ray)."""

import argparse
import sys

import pytest

from serve_app.bench import modes
from serve_app.bench.__main__ import main


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    modes.add_arguments(parser)
    return parser.parse_args(argv)


def test_mode_env_sets_its_switch_and_clears_the_others():
    base = {
        "PATH": "/bin",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        "RAY_ADDRESS": "10.0.0.1:6379",
    }
    env = modes.mode_env("throughput", base)
    assert env["PATH"] == "/bin"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        assert name not in env
    assert env["RAY_ADDRESS"] == "local"  # a fresh Ray, never the cluster in the environment
    assert env[modes.DRAIN_VARIABLE] == modes.BENCH_DRAIN_S
    default = modes.mode_env("default", base)
    assert not any(name in default for name in modes.MODE_VARIABLES)
    assert not any(name in default for name in modes.HAPROXY_PORT_VARIABLES)


def test_haproxy_env_gets_free_side_ports_unless_given():
    env = modes.mode_env("haproxy", {"RAY_SERVE_HAPROXY_STATS_PORT": "9999"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "9999"
    assert int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]) > 0
    both = modes.mode_env("both", {})
    assert both["RAY_SERVE_ENABLE_HA_PROXY"] == both["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert modes.mode_env("default", {modes.DRAIN_VARIABLE: "30"})[modes.DRAIN_VARIABLE] == "30"


def test_parse_modes():
    assert modes.parse_modes("default, haproxy") == ["default", "haproxy"]
    with pytest.raises(SystemExit, match="nope"):
        modes.parse_modes("default,nope")


def test_report_command_passes_only_given_options(tmp_path):
    args = parse("--seconds", "2", "--concurrency", "1,8", "--report-args=--access-log")
    command = modes.report_command(args, tmp_path / "haproxy")
    assert command[:4] == [sys.executable, "-m", "serve_app.bench", "report"]
    out = str(tmp_path / "haproxy")
    assert command[4:] == [
        "--concurrency", "1,8", "--seconds", "2.0", "--access-log", "--out", out
    ]  # fmt: skip


def fake_report(img_s: list[float], p50_c1: float, efficiency: float, added_ms: float) -> dict:
    serve = [
        {"config": "batched", "concurrency": c, "images_per_s": v, "p50_s": p50_c1 * c,
         "errors": {}}
        for c, v in zip([1, 4, 16], img_s, strict=True)
    ]  # fmt: skip
    serve.append(
        {"config": "unbatched", "concurrency": 1, "images_per_s": 99.0, "p50_s": 0.1,
         "errors": {"http_503": 2}}
    )  # fmt: skip
    return {
        "settings": {"max_batch_images": 8},
        "in_process": [
            {"batch": 1, "seconds_per_call": 0.1, "images_per_s": 10.0},
            {"batch": 8, "seconds_per_call": 0.4, "images_per_s": 20.0},
        ],
        "serve": serve,
        "ratios": {
            "serving_efficiency": efficiency,
            "added_latency_c1_ms": added_ms,
            "e2e_batching_gain": 1.5,
        },
    }


def test_summarize_takes_saturation_and_c1_from_the_batched_rows():
    row = modes.summarize("haproxy", fake_report([8.0, 18.0, 17.0], 0.12, 0.9, 20.0))
    assert row["saturation_images_per_s"] == 18.0 and row["saturation_concurrency"] == 4
    assert row["p50_c1_ms"] == 120.0
    assert (row["in_process_batch"], row["in_process_images_per_s"]) == (8, 20.0)
    assert (row["serving_efficiency"], row["added_latency_c1_ms"]) == (0.9, 20.0)
    assert row["errors"] == 2
    assert row["env"] == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def test_compare_and_markdown():
    rows = [
        modes.summarize("default", fake_report([8.0, 16.0, 16.0], 0.12, 0.8, 20.0)),
        modes.summarize("throughput", fake_report([8.0, 18.0, 18.0], 0.11, 0.9, 10.0)),
        {"mode": "haproxy", "env": modes.MODES["haproxy"], "error": "report: 1"},
    ]
    compared = modes.compare(rows)
    assert "images_per_s_vs_default" not in compared[0]
    assert compared[1]["images_per_s_vs_default"] == 1.125
    assert compared[1]["p50_c1_ms_vs_default"] == -10.0
    assert compared[2]["error"] == "report: 1"
    summary = {
        "machine": "test box",
        "report_command": "-m serve_app.bench report --out DIR/<mode>",
        "modes": compared,
        "checks": {
            "default": {
                "streaming": {"ok": True, "detail": ""},
                "cancellation": {"ok": False, "detail": "next request 9 s"},
            },
            "haproxy": {},
        },
    }
    text = modes.markdown(summary)
    assert "| throughput | `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` | 0.9 | 18.0 (4) | 1.125 |" in text
    assert "| default | (none) | 0.8 | 16.0 (4) | — | 120.0 | 20.0 | 2 |" in text
    assert "| haproxy | `RAY_SERVE_ENABLE_HA_PROXY=1` | report: 1 |" in text
    assert "| default | ok | FAIL (next request 9 s) |" in text
    assert "| haproxy | not run | not run |" in text


def test_check_config_has_one_model_replica_and_no_lora():
    config = modes.check_config(12345, cache_dir="/tmp/models")
    assert config["http_options"]["port"] == 12345
    [app] = config["applications"]
    model = app["args"]["models"][0]
    assert "lora" not in model and model["cache_dir"] == "/tmp/models"
    scaled = [d for d in app["deployments"] if "autoscaling_config" in d]
    assert scaled and all(d["autoscaling_config"]["max_replicas"] == 1 for d in scaled)


def test_cli_registers_modes(monkeypatch):
    seen: dict[str, argparse.Namespace] = {}
    monkeypatch.setattr(modes, "run", lambda args: seen.setdefault("args", args))
    # set_defaults captured the function at parser build time: patch before main builds it.
    assert main(["modes", "--modes", "default", "--no-checks", "--seconds", "1"]) == 0
    assert seen["args"].modes == "default" and seen["args"].seconds == 1.0
