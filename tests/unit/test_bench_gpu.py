"""`python -m serve_app.bench gpu` runs end to end on CPU with the tiny model."""

import json

from serve_app.bench.__main__ import main


def test_gpu_benchmark_runs_on_cpu_with_tiny(tiny_cache_dir, tmp_path, monkeypatch, capsys):
    cache_root = tmp_path / "cache"
    cache_root.mkdir()
    (cache_root / "tiny-flux-kontext-v1").symlink_to(tiny_cache_dir)
    monkeypatch.setenv("SERVE_APP_CACHE", str(cache_root))
    out = tmp_path / "gpu.json"
    args = ["gpu", "--source", "tiny", "--size", "64x64", "--steps", "2", "--repeat", "1"]
    assert main([*args, "--options", "plain,cache,fp8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["option"]: row for row in result["rows"]}
    for option in ("plain", "cache"):
        assert rows[option]["text_to_image_s_per_image"] > 0
        assert rows[option]["edit_s_per_image"] > 0
    assert "needs a CUDA GPU" in rows["fp8"]["error"]
    assert result["machine"]["cores"] >= 1 and result["settings"]["size"] == "64x64"
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| fp8 | — |" in printed and "1.00x" in printed
