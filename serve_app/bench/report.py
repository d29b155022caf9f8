"""Serving overhead, batching gain and latency under load: `python -m serve_app.bench report`.

One run measures, side by side on the same machine:
1. the pipeline in process (no Ray, no HTTP): images/s and latency at batch sizes 1, 2, 4, 8,
   encoding each image included (the server encodes too);
2. the Serve app over HTTP at each concurrency, with batching and with `max_batch_images=1`
   (asynchronous jobs off: they need Redis and Celery, which a bench does not use);
3. the ratios: serving efficiency, end-to-end batching gain, added latency at concurrency 1.
Results: JSON and a markdown table in `--out`, rewritten after every level (so a run stopped
early leaves what it measured), and a PNG plot at the end. `--budget-s`: batch sizes and levels
that would not fit the time left are skipped, each with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import socket
import statistics
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

from serve_app.bench.machine import Budget, bench_job, describe, device_label

MARGIN = 1.2  # on every estimate of a batch size, level or deploy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="tiny", help="'tiny', a hub id or a local directory")
    parser.add_argument("--device", default="auto", help="auto, cuda (a GPU per replica) or cpu")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--max-batch-images", type=int, default=8)
    parser.add_argument(
        "--batch-wait",
        type=float,
        default=None,
        help="batch_wait_timeout_s (default: the config default)",
    )
    parser.add_argument("--seconds", type=float, default=10, help="measured time per level")
    parser.add_argument("--repeat", type=int, default=8, help="in-process calls per batch size")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads in process and in the replica (default: all)",
    )
    parser.add_argument(
        "--url", default=None, help="measure a running app (no unbatched run, no batching gain)"
    )
    parser.add_argument("--access-log", action="store_true", help="keep Ray Serve access logs")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip batch sizes and levels that would not fit the seconds left (default: none)",
    )
    parser.add_argument("--out", default="results", help="directory for bench.json/.md/.png")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_config(args):
    from serve_app.config import ModelConfig

    return ModelConfig(
        id="bench",
        source=args.source,
        device=args.device,
        torch_threads=args.torch_threads,
        warmup_sizes=[args.size],
        min_side=16,
    )


def pipeline_baseline(
    args, budget: Budget | None = None, skipped: list[dict] | None = None
) -> list[dict]:
    """Images/s per batch size in this process, encoding included. With `budget`, a batch size
    after the first that its estimate (batch 1's seconds per image) does not fit is skipped and
    listed in `skipped`; the load's seconds are in `LOAD_S` (an estimate of a replica's)."""
    import torch

    from serve_app.codec import encode_image
    from serve_app.engine import ImageEngine

    config = model_config(args)
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    engine = ImageEngine(config)
    started = time.perf_counter()
    engine.load()
    LOAD_S["in_process"] = time.perf_counter() - started
    rows: list[dict] = []
    for batch in _ints(args.batch_sizes):
        if budget is not None and rows:
            per_image = rows[0]["seconds_per_call"] / rows[0]["batch"]
            needed = per_image * batch * (args.repeat + 2 / args.steps) * MARGIN
            if budget.left() < needed:
                reason = f"time budget: {budget.left():.0f}s left, needs ~{needed:.0f}s"
                if skipped is not None:
                    skipped.append({"config": "in process", "batch": batch, "reason": reason})
                print(f"  in process batch {batch}: skipped ({reason})")
                continue
        job = bench_job(config, args.size, args.steps, n=batch)
        engine.generate([dataclasses.replace(job, steps=2)])  # warm the shape up
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            [images] = engine.generate([job])
            for image in images:
                encode_image(image, "png")
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        rows.append(
            {
                "batch": batch,
                "seconds_per_call": round(median, 4),
                "images_per_s": round(batch / median, 3),
            }
        )
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the replica, another process, loads its own copy next
    return rows


LOAD_S: dict[str, float] = {}  # seconds: the in-process load, the app's first deploy


def level_estimate(args, concurrency: int, rows: list[dict], baseline: list[dict]) -> float:
    """Seconds a level takes: its warm-up (1 s), its duration, then the requests in flight when
    it ends (twice the p99 latency of the last level, scaled by concurrency, or from the
    in-process calls before any level ran)."""
    if rows:
        last = rows[-1]
        latency = last["p99_s"] * max(concurrency / last["concurrency"], 1)
    else:  # each request waits for those ahead of it: batch 1's seconds per image each
        by_batch = {row["batch"]: row["seconds_per_call"] for row in baseline}
        per_image = by_batch[min(by_batch)] / min(by_batch) if by_batch else 0.0
        latency = per_image * concurrency
    return (1 + args.seconds + 2 * latency) * MARGIN


def serve_levels(
    url: str,
    args,
    label: str,
    budget: Budget | None = None,
    skipped: list[dict] | None = None,
    on_level: Callable[[list[dict]], None] | None = None,
    baseline: list[dict] | None = None,
) -> list[dict]:
    """Throughput and latency over HTTP at each concurrency, after a short warm-up. With
    `budget`, a level whose estimate does not fit is skipped (listed in `skipped`, with the
    reason); `on_level(rows)` runs after each level (to write the results so far)."""
    import asyncio

    from serve_app.bench.load import run_load

    rows: list[dict] = []
    for concurrency in _ints(args.concurrency):
        if budget is not None:
            needed = level_estimate(args, concurrency, rows, baseline or [])
            if budget.left() < needed:
                reason = f"time budget: {budget.left():.0f}s left, needs ~{needed:.0f}s"
                if skipped is not None:
                    skipped.append({"config": label, "concurrency": concurrency, "reason": reason})
                print(f"  {label} c={concurrency}: skipped ({reason})")
                continue
        load = Namespace(
            url=url,
            requests=10**9,
            duration=args.seconds,
            concurrency=concurrency,
            warmup=10**9,
            size=args.size,
            steps=args.steps,
            n=1,
            model=None,
            api_key=None,
            timeout=120,
        )
        asyncio.run(run_load(Namespace(**{**vars(load), "duration": 1.0})))  # warm-up
        result = asyncio.run(run_load(load))
        rows.append(
            {
                "config": label,
                "concurrency": concurrency,
                "images_per_s": result["images_per_s"],
                "p50_s": result["latency_s"]["p50"],
                "p95_s": result["latency_s"]["p95"],
                "p99_s": result["latency_s"]["p99"],
                "mean_batch_images": result["mean_batch_images"],
                "errors": {k: v for k, v in result["outcomes"].items() if k != "ok"},
            }
        )
        print(
            f"  {label} c={concurrency}: {rows[-1]['images_per_s']} img/s, p50 {rows[-1]['p50_s']}"
        )
        if on_level is not None:
            on_level(rows)
    return rows


def app_config(args, max_batch_images: int) -> dict:
    """The bench's Serve app: the one model, the batching asked, and asynchronous jobs off (Ray's
    task-consumer path imports Celery and needs Redis; a bench machine may have neither)."""
    batching: dict = {"max_batch_images": max_batch_images}
    if args.batch_wait is not None:
        batching["batch_wait_timeout_s"] = args.batch_wait
    return {
        "models": [model_config(args).model_dump()],
        "batching": batching,
        "access_log": args.access_log,
        "jobs": {"enabled": False},
    }


class LocalApp:
    """The Serve app on a private Ray instance, redeployable with other batching settings."""

    def __init__(self, args) -> None:
        import ray
        from ray import serve

        self.args = args
        self.port = _free_port()
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"

    def deploy(self, max_batch_images: int) -> None:
        import httpx
        from ray import serve

        from serve_app.app import build_app

        app = build_app(app_config(self.args, max_batch_images))
        serve.run(app, name="images", route_prefix="/")
        deadline = time.monotonic() + 300
        while httpx.get(f"{self.url}/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not become healthy")
            time.sleep(0.5)

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def ratios(baseline: list[dict], batched: list[dict], unbatched: list[dict], args) -> dict:
    if not baseline or not batched:
        return {}
    by_batch = {row["batch"]: row for row in baseline}
    same_batching = by_batch.get(args.max_batch_images) or max(baseline, key=lambda r: r["batch"])
    saturation = max(batched, key=lambda row: row["images_per_s"])
    result = {
        "in_process_batching_gain": round(
            same_batching["images_per_s"] / by_batch[min(by_batch)]["images_per_s"], 3
        ),
        "serving_efficiency": round(saturation["images_per_s"] / same_batching["images_per_s"], 3),
        "saturation_concurrency": saturation["concurrency"],
    }
    level = {row["concurrency"]: row for row in batched}
    single = level.get(1)
    if single and 1 in by_batch:
        added = single["p50_s"] - by_batch[1]["seconds_per_call"]
        result["added_latency_c1_ms"] = round(1000 * added, 1)
    plain = {row["concurrency"]: row for row in unbatched}
    if set(level) & set(plain):
        shared = 8 if 8 in level and 8 in plain else max(set(level) & set(plain))
        result["batching_gain_concurrency"] = shared
        result["e2e_batching_gain"] = round(
            level[shared]["images_per_s"] / plain[shared]["images_per_s"], 3
        )
    return result


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"# Benchmark: {device_label(result['machine'])}",
        "",
        f"Model `{s['source']}`, {s['size']}, {s['steps']} steps, PNG; max_batch_images "
        f"{s['max_batch_images']}; torch threads {result['machine']['torch_threads']}; "
        f"{s['seconds']} s per level.",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    r = result["ratios"]
    targets = {
        "serving_efficiency": ">= 0.9",
        "e2e_batching_gain": f">= in-process gain ({r.get('in_process_batching_gain')})",
        "added_latency_c1_ms": "<= 25 ms",
        "in_process_batching_gain": "—",
    }
    for key in (
        "serving_efficiency",
        "e2e_batching_gain",
        "added_latency_c1_ms",
        "in_process_batching_gain",
    ):
        if key in r:
            lines.append(f"| {key} | {r[key]} | {targets[key]} |")
    lines += ["", "In process:", "", "| batch | s/call | images/s |", "|---|---|---|"]
    lines += [
        f"| {row['batch']} | {row['seconds_per_call']} | {row['images_per_s']} |"
        for row in result["in_process"]
    ]
    lines += [
        "",
        "Over HTTP:",
        "",
        "| config | concurrency | images/s | p50 s | p95 s | p99 s | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["serve"]:
        lines.append(
            f"| {row['config']} | {row['concurrency']} | {row['images_per_s']} "
            f"| {row['p50_s']:.4f} | {row['p95_s']:.4f} | {row['p99_s']:.4f} "
            f"| {row['mean_batch_images']} "
            f"| {row['errors'] or ''} |"
        )
    if result.get("skipped"):
        lines += ["", "Skipped:", ""]
        for row in result["skipped"]:
            what = f"batch {row['batch']}" if "batch" in row else f"c={row.get('concurrency')}"
            lines.append(f"- {row['config']} {what}: {row['reason']}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in sorted({row["config"] for row in result["serve"]}):
        rows = [row for row in result["serve"] if row["config"] == label]
        x = [row["concurrency"] for row in rows]
        left.plot(x, [row["images_per_s"] for row in rows], marker="o", label=label)
        right.plot(x, [1000 * row["p50_s"] for row in rows], marker="o", label=f"{label} p50")
        right.plot(
            x,
            [1000 * row["p95_s"] for row in rows],
            linestyle="--",
            marker=".",
            label=f"{label} p95",
        )
    best = max(result["in_process"], key=lambda row: row["batch"])
    left.axhline(
        best["images_per_s"],
        color="gray",
        linestyle=":",
        label=f"in process, batch {best['batch']}",
    )
    left.set(xlabel="concurrency", ylabel="images/s", title="Throughput", xscale="log", xticks=[])
    right.set(xlabel="concurrency", ylabel="ms", title="Latency", xscale="log")
    for axis in (left, right):
        axis.set_xticks(sorted({row["concurrency"] for row in result["serve"]}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    s = result["settings"]
    figure.suptitle(
        f"{device_label(result['machine'])} | {s['source']} {s['size']} {s['steps']} steps",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(out: Path, result: dict, args) -> None:
    """bench.json and bench.md of what was measured so far (ratios of what is there)."""
    serve_rows = result["serve"]
    result["ratios"] = ratios(
        result["in_process"],
        [row for row in serve_rows if row["config"] == "batched"],
        [row for row in serve_rows if row["config"] == "unbatched"],
        args,
    )
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown(result))


def run(args) -> dict:
    # The same torch threads in process and in the replica, or the comparison is unfair.
    args.torch_threads = args.torch_threads or os.cpu_count()
    budget = Budget(args.budget_s) if args.budget_s is not None else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("in-process baseline ...")
    skipped: list[dict] = []
    baseline = pipeline_baseline(args, budget, skipped)
    result: dict = {
        "machine": describe(),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "in_process": baseline,
        "serve": [],
        "skipped": skipped,
    }
    done: list[dict] = []  # the levels of the configs finished so far

    def save(rows: list[dict] | None = None) -> None:
        result["serve"] = done + (rows or [])
        write_results(out, result, args)

    save()
    if args.url:
        done += serve_levels(args.url, args, "batched", budget, skipped, save, baseline)
    else:
        app: LocalApp | None = None
        try:
            for label, max_batch in (("batched", args.max_batch_images), ("unbatched", 1)):
                # A deploy: measured once, else the in-process load and four calls' warm-up.
                first_call = baseline[0]["seconds_per_call"] if baseline else 0.0
                deploy = LOAD_S.get("deploy", 30 + LOAD_S.get("in_process", 0) + 4 * first_call)
                if app is None:
                    deploy += 15  # Ray and Serve start
                needed = deploy * MARGIN + level_estimate(
                    args, _ints(args.concurrency)[0], [], baseline
                )
                if budget is not None and budget.left() < needed:
                    reason = (
                        f"time budget: {budget.left():.0f}s left, a deploy and its first level "
                        f"need ~{needed:.0f}s"
                    )
                    for concurrency in _ints(args.concurrency):
                        skipped.append(
                            {"config": label, "concurrency": concurrency, "reason": reason}
                        )
                    print(f"  {label}: skipped ({reason})")
                    save()
                    continue
                started = time.perf_counter()
                if app is None:
                    app = LocalApp(args)
                app.deploy(max_batch)
                LOAD_S.setdefault("deploy", time.perf_counter() - started)
                done += serve_levels(app.url, args, label, budget, skipped, save, baseline)
                save()
        finally:
            if app is not None:
                app.close()
    save()
    if result["serve"] and baseline:
        plot(result, out / "bench.png")
    print(markdown(result))
    print(f"wrote {out}/bench.json, bench.md" + (", bench.png" if result["serve"] else ""))
    return result
