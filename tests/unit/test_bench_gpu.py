"""`scripts/gpu-check.sh` (the prepared GPU check) runs end to end on a CPU with the tiny model:
the same script, benchmark and result files a lent GPU produces."""

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from serve_app.bench import gpu, report
from serve_app.bench.gpu import ATTENTION_BACKENDS
from serve_app.config import AppArgs
from serve_app.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]


def broken_torchao_wheel(folder: Path) -> Path:
    """A torchao 0.18.0 wheel whose import fails the way one built for another torch can."""
    folder.mkdir()
    files = {
        "torchao/__init__.py": "raise RuntimeError('torchao 0.18 needs torch >= 2.11')\n",
        "torchao-0.18.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: torchao\n"
        "Version: 0.18.0\n",
        "torchao-0.18.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append("torchao-0.18.0.dist-info/RECORD,,")
    files["torchao-0.18.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(folder / "torchao-0.18.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return folder


def test_gpu_check_runs_on_cpu_with_tiny(tiny_cache_dir, tmp_path):
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    (cache_root / "tiny-flux-kontext-v1").symlink_to(tiny_cache_dir)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "WHEELS": str(broken_torchao_wheel(tmp_path / "wheels")),  # the rest is installed here
        "RESULTS": str(tmp_path / "results"),
        "SERVE_APP_CACHE": str(cache_root),
        "CUDA_VISIBLE_DEVICES": "",  # a CPU run even where GPUs are
    }
    args = ["--source", "tiny", "--size", "128x128", "--small-size", "64x64", "--steps", "2"]
    args += ["--batches", "1,2", "--small-batches", "1,2,4"]
    args += ["--only", "plain,batches,cache,attention,fp8-compile,fp8-compile-cache"]
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "gpu.json").read_text())
    rows = {row["step"]: row for row in result["rows"]}

    plain = rows["plain"]
    assert plain["text_to_image"]["s_per_image"] > 0 and plain["edit"]["s_per_image"] > 0
    # FLOPs of the loaded (tiny) transformer; an edit's conditioning image adds its tokens.
    assert 0 < plain["text_to_image"]["flops_per_image"] <= plain["edit"]["flops_per_image"]
    assert plain["text_to_image"]["peak_memory_gib"] is None  # no GPU to measure
    assert rows["cache"]["text_to_image"]["s_per_image"] > 0
    # Backends that need packages this machine lacks are reported, not fatal.
    assert "flash-attn" in rows["attention:flash"]["error"]
    # The carried torchao does not import: left off PYTHONPATH (diffusers still loads), and
    # both fp8 rows are skipped saying why.
    assert "fp8 rows will be skipped" in done.stderr
    for name in ("fp8-compile", "fp8-compile-cache"):
        assert "torchao 0.18.0 does not import" in rows[name]["skipped"]
        assert "needs torch >= 2.11" in rows[name]["skipped"]
    assert list(rows) == ["plain", "fp8-compile", "batches", "cache"] + [
        f"attention:{b}" for b in ATTENTION_BACKENDS
    ] + ["fp8-compile-cache"]  # the headline rows first
    assert all(row["estimate_s"] >= 0 for row in rows.values() if "wall_s" in row)
    series = rows["batches"]["series"]
    assert [m["n"] for m in series["128x128"]] == [1, 2]
    assert [m["n"] for m in series["64x64"]] == [1, 2, 4]
    assert all(m["speedup_vs_1"] > 0 for m in series["64x64"][1:])
    assert result["settings"]["source"] == "tiny" and result["machine"]["torch"]

    # Sequence parallelism needs >= 2 GPUs: skipped, saying why, in a row of its own.
    parallel = json.loads((tmp_path / "results" / "parallel.json").read_text())
    assert parallel == {"step": "parallel", "skipped": "0 GPUs on this machine; needs >= 2"}
    assert "gpu-check: parallel: skipped (0 GPUs on this machine; needs >= 2)" in done.stdout

    table = (tmp_path / "results" / "gpu.md").read_text()
    assert table.strip() in done.stdout  # printed too
    assert "torch " in table.splitlines()[0] and "| plain |" in table and "1.00x" in table
    assert "| 64x64 | 4 |" in table


def test_gpu_check_says_what_to_do_without_the_wheels(tmp_path):
    """On a machine without diffusers (the lent GPU before `gpu-wheels.sh`), a clear message."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh")],
        env={**os.environ, "PYTHON": str(bare / "bin" / "python"), "WHEELS": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "scripts/gpu-wheels.sh" in done.stderr
    # The real import error, and what is installed, not a guess.
    assert "ModuleNotFoundError: No module named 'diffusers'" in done.stderr
    assert "found torch missing, transformers missing" in done.stderr
    assert "diffusers and pydantic missing" in done.stderr


def _gpu_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def _bench(**measured) -> gpu.Bench:
    """A Bench with no engine and no machine: just the arguments and what was measured."""
    bench = gpu.Bench.__new__(gpu.Bench)
    bench.args = _gpu_args("--size", "1024x1024", "--steps", "28")
    bench.family, bench.edits_only = FAMILIES["flux-kontext"], False
    bench.size, bench.small_size = (1024, 1024), (512, 512)
    bench.machine = {"gpu": "NVIDIA H200"}
    bench.weights, bench.plain_load_s, bench.fp8_load_s = "plain", 20.0, None
    bench.speeds, bench.compile_s = {}, {}
    for name, value in measured.items():
        setattr(bench, name, value)
    return bench


def test_fp8_compile_estimate_comes_from_the_measured_compile():
    plain = gpu.Speeds(8.0, 18.0, "plain")
    compiled = gpu.Speeds(6.0, 14.0, "compile")
    before = _bench(speeds={"plain": plain})
    assert "prior" in before.estimate_fp8().basis  # nothing compiled yet: a stated prior
    fast = _bench(speeds={"plain": plain, "compile": compiled}, compile_s={"compile": 40.0})
    slow = _bench(speeds={"plain": plain, "compile": compiled}, compile_s={"compile": 200.0})
    assert fast.estimate_fp8().seconds < 150 < slow.estimate_fp8().seconds
    assert "compile 40 s measured in compile" in fast.estimate_fp8().basis
    work = (6.0 + 14.0) * (1 + 2 / 28) * gpu.MARGIN
    load = 20.0 * gpu.LOAD_FP8_FACTOR
    assert fast.estimate_fp8().seconds == (load + 40.0 * gpu.FP8_COMPILE_FACTOR * gpu.MARGIN + work)
    # The last row: the fp8 row's own load and compile.
    done = _bench(
        speeds={"fp8-compile": gpu.Speeds(4.0, 9.0, "fp8-compile")},
        compile_s={"compile": 40.0, "fp8-compile": 55.0},
        fp8_load_s=30.0,
    )
    assert "compile 55 s measured in fp8-compile" in done.estimate_fp8_cache().basis
    # Eager steps after compile replaced the weights: the plain load again, then plain speeds.
    reloaded = _bench(speeds={"plain": plain}, weights="compiled")
    assert reloaded.reload_plain().seconds == 20.0 * gpu.MARGIN
    assert _bench(speeds={"plain": plain}).reload_plain().seconds == 0


def test_skipped_steps_say_why(tmp_path):
    bench = _bench(speeds={"plain": gpu.Speeds(8.0, 18.0, "plain")})
    bench.args = _gpu_args("--out", str(tmp_path / "gpu.json"))
    bench.only, bench.rows, bench.peak_tflops = set(gpu.STEPS), [], None
    bench.machine = {"gpu": "NVIDIA H200", "torch": "2.11.0", "cpu": "x", "cores": 16}
    bench.budget = gpu.Budget(30)
    ran = []
    bench.step("compile", bench.estimate_compile, lambda: ran.append(1) or {})
    bench.step("fp8-compile", bench.estimate_fp8, dict, skip="torchao does not import")
    assert not ran
    compile_row, fp8_row = bench.rows
    assert compile_row["skipped"].startswith("time budget: 30s left, needs ~")
    assert "1 t2i + 1 edit at plain 8.0/18.0 s" in compile_row["skipped"]
    assert fp8_row == {"step": "fp8-compile", "skipped": "torchao does not import"}
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == bench.rows


def _report_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_report_app_has_jobs_off():
    """Jobs need Ray's task consumer (Celery) and Redis, which a lent GPU machine lacks."""
    config = report.app_config(_report_args("--source", "synthetic", "--batch-wait", "0.1"), 4)
    assert config["jobs"] == {"enabled": False}
    args = AppArgs.model_validate(config)  # what build_app validates
    assert args.jobs.enabled is False
    assert args.batching.max_batch_images == 4 and args.batching.batch_wait_timeout_s == 0.1
    assert args.models[0].source == "synthetic"


def test_bench_report_levels_skip_once_out_of_time(tmp_path):
    args = _report_args("--seconds", "30", "--concurrency", "1,2", "--budget-s", "5")
    skipped: list[dict] = []
    baseline = [{"batch": 1, "seconds_per_call": 6.0, "images_per_s": 0.17}]
    rows = report.serve_levels(
        "http://127.0.0.1:9", args, "batched", report.Budget(5), skipped, None, baseline
    )
    assert rows == [] and [s["concurrency"] for s in skipped] == [1, 2]
    assert skipped[0]["reason"].startswith("time budget: ")
    # Partial results still make a report: no ratios without levels, the skips listed.
    result = {
        "machine": {"gpu": "NVIDIA H200", "torch_threads": 16},
        "settings": {**vars(args), "source": "synthetic", "size": "1024x1024", "steps": 28},
        "in_process": baseline,
        "serve": [],
        "skipped": skipped,
    }
    report.write_results(tmp_path, result, args)
    assert json.loads((tmp_path / "bench.json").read_text())["ratios"] == {}
    assert "- batched c=1: time budget" in (tmp_path / "bench.md").read_text()


def test_bench_gpu_takes_any_family_skipping_what_it_does_not_run(tmp_path, monkeypatch):
    """`bench gpu --family qwen-image-edit` on its tiny model: an edit-only family measures
    edits where others measure text-to-image, and each switch the family does not run is
    skipped, naming it; no MFU without a FLOP count for its transformer."""
    import torch

    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(2)
    args = _gpu_args(
        "--family", "qwen-image-edit", "--source", "tiny", "--size", "64x64",
        "--small-size", "96x64", "--steps", "2", "--batches", "1,2", "--small-batches", "1",
        "--only", "plain,batches,cache,fp8-compile", "--peak-tflops", "100",
        "--out", str(tmp_path / "gpu.json"),
    )  # fmt: skip
    result = gpu.run(args)
    rows = {row["step"]: row for row in result["rows"]}
    assert result["settings"]["family"] == "qwen-image-edit"
    plain = rows["plain"]
    assert "text_to_image" not in plain and plain["edit"]["s_per_image"] > 0
    assert plain["edit"]["flops_per_image"] is None and "mfu" not in plain["edit"]
    series = rows["batches"]["series"]
    assert [r["n"] for r in series["64x64"]] == [1, 2] and [r["n"] for r in series["96x64"]] == [1]
    assert (
        "first_block_cache_threshold is not a switch of family qwen-image-edit"
        in (rows["cache"]["skipped"])
    )
    assert "quantization is not a switch" in rows["fp8-compile"]["skipped"]
    assert "edit" in (tmp_path / "gpu.md").read_text()
