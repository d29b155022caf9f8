"""One request across ranks: `python -m serve_app.bench parallel`.

Latency of one request (default 1024x1024) on 1 rank and on N sequence-parallel ranks
(`serve_app.parallel`), from the same run, and the serving overhead the ranks add: the per-step
broadcast of the stop-or-continue decision (`sequence_parallel.StepAgreement`) and the sending
of each call to the peers. Rank 0 runs in a Ray task holding what a replica holds (a GPU on
CUDA), so that on a multi-GPU machine every rank has its own GPU.

On CPU the ranks share the machine's cores (each gets cores/N threads, the 1-rank run all of
them), so the CPU figures show correctness and overhead, not a speed-up; GPU figures come from
a multi-GPU machine (`scripts/gpu-check.sh` runs this where it has several GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench-results") / "parallel"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, default=2, help="Ulysses degree to compare with 1.")
    parser.add_argument("--size", default="1024x1024", help="WxH of the one request.")
    parser.add_argument("--steps", type=int, default=None, help="Default: the model's medium.")
    parser.add_argument("--source", default="tiny", help="Model source (tiny, synthetic, a path).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls per setting.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


def _measure(config: dict, width: int, height: int, steps: int | None, repeats: int, threads: int):
    """In a Ray task: load the engine (1 rank, or rank 0 of N), one untimed call, then the
    timed ones; the per-step agreement and the dispatch to the peers are timed apart."""
    import torch

    from serve_app.config import ModelConfig
    from serve_app.contract import ModelRequest

    torch.set_num_threads(threads)
    model = ModelConfig.model_validate(config)
    if model.parallel.degree > 1:
        from serve_app.parallel import ParallelEngine

        engine: Any = ParallelEngine(model)
    else:
        from serve_app.engine import ImageEngine

        engine = ImageEngine(model)
    engine.load()
    steps = steps or model.quality_steps.medium
    request = ModelRequest("bench", "a lighthouse at dawn", width, height, steps, 2.5, (1,))
    engine.generate([request])  # first call: allocator growth, kernel choice
    agreement = getattr(engine, "agreement", None)
    if agreement is not None:
        agreement.seconds, agreement.count = 0.0, 0
    seconds = []
    for _ in range(repeats):
        if model.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.generate([request])
        if model.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    result = {
        "ranks": model.parallel.degree,
        "threads_per_rank": threads,
        "steps": steps,
        "seconds": seconds,
        "median_s": statistics.median(seconds),
    }
    if agreement is not None:
        result["agreement_ms_per_step"] = 1000 * agreement.seconds / max(agreement.count, 1)
        result["idle_broadcast_ms"] = 1000 * engine.broadcast_seconds()
        engine.close()
    return result


def measure(args: argparse.Namespace) -> dict:
    import ray

    from serve_app.geometry import parse_wxh

    width, height = parse_wxh(args.size)
    cores = os.cpu_count() or 1
    gpus = 1 if args.device == "cuda" else 0
    started_ray = not ray.is_initialized()  # else a Ray already running (tests) is used
    if started_ray:
        ray.init(address="local", num_cpus=max(cores, args.ranks), include_dashboard=False)
    try:
        task = ray.remote(_measure).options(num_cpus=0, num_gpus=gpus)
        base = {"id": "bench", "source": args.source, "device": args.device, "warmup": False}
        runs = []
        for ranks in (1, args.ranks):
            config = {**base, **({"parallel": {"ulysses": ranks}} if ranks > 1 else {})}
            threads = cores if args.device == "cpu" and ranks == 1 else max(1, cores // ranks)
            runs.append(
                ray.get(task.remote(config, width, height, args.steps, args.repeats, threads))
            )
    finally:
        if started_ray:
            ray.shutdown()
    one, many = runs
    return {
        "size": args.size,
        "source": args.source,
        "device": args.device,
        "cores": cores,
        "runs": runs,
        "speedup": one["median_s"] / many["median_s"],
        "agreement_share": many["agreement_ms_per_step"] * many["steps"] / 1000 / many["median_s"],
    }


def markdown(result: dict) -> str:
    one, many = result["runs"]
    lines = [
        f"One {result['size']} request, {result['source']} model on {result['device']} "
        f"({result['cores']} cores), {one['steps']} steps, median of {len(one['seconds'])}:",
        "",
        "| ranks | threads/rank | latency s | per-step agreement ms | idle broadcast ms |",
        "|---|---|---|---|---|",
        f"| 1 | {one['threads_per_rank']} | {one['median_s']:.3f} | - | - |",
        f"| {many['ranks']} | {many['threads_per_rank']} | {many['median_s']:.3f} | "
        f"{many['agreement_ms_per_step']:.2f} | {many['idle_broadcast_ms']:.2f} |",
        "",
        f"1 rank / {many['ranks']} ranks latency: {result['speedup']:.2f}x; the per-step "
        f"agreement is {100 * result['agreement_share']:.1f}% of the {many['ranks']}-rank call.",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    result = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "parallel.md").write_text(text)
    print(text)
