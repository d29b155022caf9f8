"""`scripts/gpu-check.sh` (the prepared GPU check) runs end to end on a CPU with the tiny model:
the same script, benchmark and result files a lent GPU produces."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_with_tiny(tiny_cache_dir, tmp_path):
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    (cache_root / "tiny-flux-kontext-v1").symlink_to(tiny_cache_dir)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "WHEELS": str(tmp_path / "no-wheels"),  # everything is installed here
        "RESULTS": str(tmp_path / "results"),
        "SERVE_APP_CACHE": str(cache_root),
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
    assert "needs a CUDA GPU" in rows["fp8-compile"]["error"]
    assert "fp8-compile-cache" not in rows  # nothing to add the cache to
    series = rows["batches"]["series"]
    assert [m["n"] for m in series["128x128"]] == [1, 2]
    assert [m["n"] for m in series["64x64"]] == [1, 2, 4]
    assert all(m["speedup_vs_1"] > 0 for m in series["64x64"][1:])
    assert result["settings"]["source"] == "tiny" and result["machine"]["torch"]

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
