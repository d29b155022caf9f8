"""Seconds per image for each speed option, plain bf16 first: `python -m serve_app.bench gpu`.

Each option loads the model afresh (compile and quantization cannot be undone), warms it up at the
measured size (compiling if needed), then times text-to-image and an edit, one image per call.
Options that cannot run on this machine are reported with the reason instead of a number.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from serve_app.bench.machine import bench_job, describe, device_label

OPTIONS = {
    "plain": {},
    "compile": {"compile": True},
    "fp8": {"quantization": "fp8"},
    "cache": {"first_block_cache_threshold": 0.08},
    "cudnn-attention": {"attention_backend": "_native_cudnn"},
    "flash-attention": {"attention_backend": "flash"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        default="black-forest-labs/FLUX.1-Kontext-dev",
        help="hub id, local directory, or 'tiny'",
    )
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement")
    parser.add_argument(
        "--options", default=",".join(OPTIONS), help=f"comma-separated, from: {', '.join(OPTIONS)}"
    )
    parser.add_argument("--out", default="results/gpu.json", help="JSON results file")


def _time_call(engine, job, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        engine.generate([job])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(option: str, args) -> dict:
    import torch
    from PIL import Image

    from serve_app.config import ModelConfig
    from serve_app.engine import FluxEngine, ModelLoadError
    from serve_app.geometry import nearest_resolution, parse_wxh

    width, height = parse_wxh(args.size)
    config = ModelConfig(
        id="bench",
        source=args.source,
        speed=OPTIONS[option],
        warmup_sizes=[args.size],
        min_side=16,
        max_side=4096,
        max_pixels=4096 * 4096,
    )
    row = {"option": option, "speed": OPTIONS[option]}
    try:
        engine = FluxEngine(config)
        engine.load()
    except ModelLoadError as exc:
        return {**row, "error": str(exc)}
    try:
        canvas = Image.new("RGB", nearest_resolution(width, height, config.resolution_buckets))
        jobs = {
            "text_to_image": bench_job(config, args.size, args.steps),
            "edit": bench_job(config, args.size, args.steps, prompt="make it night", canvas=canvas),
        }
        started = time.perf_counter()
        engine.warmup()
        row["warmup_s"] = round(time.perf_counter() - started, 3)
        for name, job in jobs.items():
            row[f"{name}_s_per_image"] = round(_time_call(engine, job, args.repeat), 4)
    except Exception as exc:  # noqa: BLE001 - an option failing at run time is a result too
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict], machine: dict, args) -> str:
    plain = next((r for r in rows if r["option"] == "plain" and "error" not in r), None)
    lines = [
        f"{device_label(machine)} | {args.source} | {args.size}, {args.steps} steps, "
        f"median of {args.repeat}",
        "",
        "| option | text-to-image s/image | edit s/image | speed-up vs plain | note |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['option']} | — | — | — | {row['error'][:120]} |")
            continue
        t2i, edit = row["text_to_image_s_per_image"], row["edit_s_per_image"]
        speedup = f"{plain['text_to_image_s_per_image'] / t2i:.2f}x" if plain else "—"
        lines.append(
            f"| {row['option']} | {t2i:.3f} | {edit:.3f} | {speedup} | "
            f"warm-up {row['warmup_s']:.1f} s |"
        )
    return "\n".join(lines)


def run(args) -> dict:
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise SystemExit(f"unknown options {sorted(unknown)}; choose from {', '.join(OPTIONS)}")
    machine = describe()
    rows = [measure(option, args) for option in options]
    result = {
        "machine": machine,
        "settings": {
            "source": args.source,
            "size": args.size,
            "steps": args.steps,
            "repeat": args.repeat,
        },
        "rows": rows,
    }
    result["table"] = table(rows, machine, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(result["table"])
    print(f"\nwrote {out}")
    return result
