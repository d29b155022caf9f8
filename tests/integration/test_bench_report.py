"""`python -m serve_app.bench report` produces its JSON, table and plot with sane values.

Runs the tool for real (own Ray instance, the app over HTTP) for a second or two per level; the
speed targets themselves are checked by running the benchmark, not here.
"""

import json
import os
import subprocess
import sys

from PIL import Image


def test_report_smoke(tiny_cache_dir, tmp_path):
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    (cache_root / "tiny-flux-kontext-v1").symlink_to(tiny_cache_dir)
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "serve_app.bench", "report",
        "--size", "64x64", "--steps", "2", "--batch-sizes", "1,2", "--concurrency", "1,2",
        "--max-batch-images", "2", "--seconds", "1.5", "--repeat", "2", "--out", str(out),
    ]  # fmt: skip
    # RAY_ADDRESS=local: the tool's `ray.init()` starts its own Ray even where a `ray start`
    # cluster runs (it would join that one otherwise); moved from tests/unit, which start no Ray.
    env = {**os.environ, "SERVE_APP_CACHE": str(cache_root), "RAY_ADDRESS": "local"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert [row["batch"] for row in result["in_process"]] == [1, 2]
    assert all(row["images_per_s"] > 0 for row in result["in_process"])
    configs = {(row["config"], row["concurrency"]) for row in result["serve"]}
    assert configs == {("batched", 1), ("batched", 2), ("unbatched", 1), ("unbatched", 2)}
    assert all(row["images_per_s"] > 0 and not row["errors"] for row in result["serve"])
    ratios = result["ratios"]
    for key in ("serving_efficiency", "e2e_batching_gain", "in_process_batching_gain"):
        assert ratios[key] > 0, ratios
    assert "added_latency_c1_ms" in ratios
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    table = (out / "bench.md").read_text()
    assert "| serving_efficiency |" in table and "| unbatched | 2 |" in table
    with Image.open(out / "bench.png") as plot:
        assert plot.format == "PNG" and plot.width > 500
