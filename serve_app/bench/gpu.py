"""Seconds per image, speed-ups and peak memory of the speed switches and of batches: `python -m
serve_app.bench gpu` (what `scripts/gpu-check.sh` runs on a lent GPU).

In-process (no Ray, no HTTP): the engine the model deployment runs, at the size and steps asked,
text-to-image and a single-image edit. Steps, in order of importance, each skipped with the reason
once the time budget could not hold it:

1. plain: the dtype's eager path, then batches of text-to-image at the large and small sizes;
   then LoRA: a first adapter load (read, inject), seconds per image with it, and the cost of
   switching adapter sets between calls (then the adapters are unloaded again);
2. switches that can be undone on the same weights: first-block cache, each attention backend;
3. compile (regional, in place, so last on these weights);
4. fp8 + compile on freshly built weights, then with the first-block cache too (the best
   combination).

Every measurement warms its exact shape up first (a short call; for compile, the compilation)
and records the peak GPU memory of its timed calls. Results are written after every step.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.bench.gpu_table import peak_tflops, table
from serve_app.bench.machine import Budget, bench_job, describe

if TYPE_CHECKING:
    from serve_app.engine import FluxEngine

# diffusers' attention backends that need no package beyond torch are tried; the others are
# tried too and reported with the reason when they do not load (no flash-attn, sageattention...).
ATTENTION_BACKENDS = (
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "flash",
    "_flash_3",
    "sage",
)
STEPS = (
    "plain",
    "batches",
    "lora",
    "cache",
    "attention",
    "compile",
    "fp8-compile",
    "fp8-compile-cache",
)
CACHE_THRESHOLD = 0.08
COMPILE_ESTIMATE_S = 200  # regional compiles of FLUX's blocks for both shapes on an H100
LORA_RANK = 32  # typical of published FLUX LoRAs (16-64), on every attention projection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="synthetic", help="synthetic, tiny, hub id or dir")
    parser.add_argument("--size", default="1024x1024", help="WxH of the switch measurements")
    parser.add_argument("--small-size", default="512x512", help="WxH of the second batch series")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batches", default="1,2,4", help="images per call at --size")
    parser.add_argument(
        "--small-batches", default="1,2,4,8", help="images per call at --small-size"
    )
    parser.add_argument("--repeat", type=int, default=1, help="timed calls per measurement")
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting steps after")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if unlisted")
    parser.add_argument(
        "--only", default=",".join(STEPS), help=f"comma-separated steps, from: {', '.join(STEPS)}"
    )
    parser.add_argument("--out", default="results/gpu.json", help="JSON results; .md beside it")


class Bench:
    def __init__(self, args) -> None:
        from serve_app.geometry import parse_wxh

        self.args = args
        self.size = parse_wxh(args.size)
        self.small_size = parse_wxh(args.small_size)
        self.budget = Budget(args.budget_s)
        self.machine = describe()
        self.peak_tflops = args.peak_tflops or peak_tflops(self.machine.get("gpu"))
        self.rows: list[dict] = []
        self.engine: FluxEngine | None = None
        self.flops: dict[tuple[int, int, int], int] = {}
        self.t2i_s: float | None = None  # plain text-to-image seconds, to estimate the rest

    # -- engine ---------------------------------------------------------------------------
    def load(self, **speed) -> None:
        from serve_app.config import ModelConfig, SpeedConfig
        from serve_app.engine import FluxEngine

        self.unload()
        width, height = self.size
        self.config = ModelConfig(
            id="bench",
            source=self.args.source,
            speed=SpeedConfig.model_validate(speed),
            warmup=False,
            min_side=16,
            max_side=4096,
            max_pixels=4096 * 4096,
            default_size=f"{width}x{height}",
        )
        engine = FluxEngine(self.config)
        started = time.perf_counter()
        engine.load()
        self.load_s = round(time.perf_counter() - started, 2)
        self.engine = engine

    @property
    def loaded(self) -> FluxEngine:
        if self.engine is None:
            raise RuntimeError("no engine: load() first")
        return self.engine

    def unload(self) -> None:
        import torch

        self.engine = None
        torch._dynamo.reset()  # compiled code holds on to the modules it was compiled for
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def job(self, size: tuple[int, int], n: int = 1, edit: bool = False):
        from PIL import Image

        from serve_app.geometry import nearest_resolution

        width, height = size
        canvas = None
        if edit:
            bucket = nearest_resolution(width, height, self.config.resolution_buckets)
            canvas = Image.new("RGB", bucket, "gray")
        prompt = "make it night" if edit else "a lighthouse at dawn"
        return bench_job(self.config, f"{width}x{height}", self.args.steps, n, prompt, canvas)

    def time_job(self, job) -> dict:
        """Warm the shape up with a 2-step call, then time `repeat` calls: median seconds per
        image, peak GPU memory, and model FLOP utilisation where the GPU's peak is known."""
        import dataclasses

        import torch

        self.loaded.generate([dataclasses.replace(job, steps=2)])
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.args.repeat):
            started = time.perf_counter()
            self.loaded.generate([job])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times) / job.n
        result = {"s_per_image": round(seconds, 4)}
        result["peak_memory_gib"] = (
            round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        )
        flops = self.flops_per_image(job)
        result["flops_per_image"] = flops
        if self.peak_tflops:
            result["mfu"] = round(flops / seconds / (self.peak_tflops * 1e12), 3)
        return result

    def flops_per_image(self, job) -> int:
        """The loaded transformer's FLOPs for one image of `job`, all steps (meta device)."""
        from serve_app.synthetic import flops_per_step

        key = (job.width, job.height, len(job.conditioning))
        if key not in self.flops:
            config = {
                k: v
                for k, v in self.loaded.pipe.transformer.config.items()
                if not k.startswith("_")
            }
            self.flops[key] = flops_per_step(
                job.width,
                job.height,
                len(job.conditioning),
                self.config.max_sequence_length,
                config,
            )
        return self.flops[key] * job.steps

    # -- steps ----------------------------------------------------------------------------
    def step(
        self, name: str, estimate_s: float, run: Callable[[], dict], needed: bool = False
    ) -> None:
        """Run one step unless the budget cannot hold its estimate; record whatever happens.
        `needed`: run it even when not selected, because a selected step builds on it."""
        row: dict = {"step": name}
        if name.split(":")[0] not in self.only and not needed:
            return
        if self.budget.left() < estimate_s:
            row["skipped"] = (
                f"time budget: {self.budget.left():.0f}s left, needs ~{estimate_s:.0f}s"
            )
        else:
            started = time.perf_counter()
            try:
                row.update(run())
            except Exception as exc:  # noqa: BLE001 - a step failing here is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["wall_s"] = round(time.perf_counter() - started, 1)
        self.rows.append(row)
        self.write()

    def switch(self, setup: Callable[[], object] | None = None) -> Callable[[], dict]:
        """A measurement of text-to-image and an edit with the switch `setup` turns on."""

        def run() -> dict:
            if setup is not None:
                setup()
            row = {"text_to_image": self.time_job(self.job(self.size))}
            row["edit"] = self.time_job(self.job(self.size, edit=True))
            return row

        return run

    def estimate(self, images: float = 3.3, extra_s: float = 0.0) -> float:
        """Seconds for `images` full-size text-to-images (an edit is ~2.3), warm-ups included."""
        if self.t2i_s is None:
            return 0.0
        return self.t2i_s * images * 1.15 + extra_s

    def run(self) -> dict:
        import torch

        self.only = {s.strip() for s in self.args.only.split(",") if s.strip()}
        unknown = self.only - set(STEPS)
        if unknown:
            raise SystemExit(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
        cuda = torch.cuda.is_available()
        compile_s = COMPILE_ESTIMATE_S if cuda else 60

        self.load()
        self.step("plain", 0, self.plain)
        self.step(
            "batches", self.estimate(sum(self.batch_sizes(self.args.batches)) + 4), self.batches
        )
        self.step("lora", self.estimate(2.5, 10), self.lora)
        self.switches_on_plain_weights(compile_s)
        if {"fp8-compile", "fp8-compile-cache"} & self.only:
            needed = "fp8-compile-cache" in self.only  # it runs on the fp8 weights
            self.step("fp8-compile", self.estimate(2, compile_s + 30), self.fp8, needed)
            if self.engine is not None and self.engine.config.speed.quantization == "fp8":
                self.step(
                    "fp8-compile-cache",
                    self.estimate(1.5, 60),
                    self.switch(lambda: _enable_cache(self.loaded.pipe.transformer)),
                )
        self.unload()
        print(self.table())
        print(f"\nwrote {self.args.out} and {Path(self.args.out).with_suffix('.md')}")
        return self.result()

    def switches_on_plain_weights(self, compile_s: float) -> None:
        """Cache and attention backends (undone after each), then compile (in place, last).
        A method, so nothing keeps these weights once the engine lets them go."""
        transformer = self.loaded.pipe.transformer
        self.step("cache", self.estimate(2), self.switch(lambda: _enable_cache(transformer)))
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        for backend in ATTENTION_BACKENDS:
            setup = lambda backend=backend: transformer.set_attention_backend(backend)  # noqa: E731
            self.step(f"attention:{backend}", self.estimate(), self.switch(setup))
            transformer.set_attention_backend("native")
        self.step("compile", self.estimate(2.5, compile_s), self.switch(self.compile))

    def plain(self) -> dict:
        row = {"load_s": self.load_s, **self.switch()()}
        self.t2i_s = row["text_to_image"]["s_per_image"]
        return row

    def batch_sizes(self, text: str) -> list[int]:
        return [int(n) for n in text.split(",") if n.strip()]

    def batches(self) -> dict:
        series = {}
        for size, counts in (
            (self.size, self.args.batches),
            (self.small_size, self.args.small_batches),
        ):
            rows: list[dict] = []
            for n in self.batch_sizes(counts):
                if rows and self.budget.left() < self.estimate(
                    n * size[0] * size[1] / (self.size[0] * self.size[1])
                ):
                    rows.append({"n": n, "skipped": "time budget"})
                    continue
                measured = {"n": n, **self.time_job(self.job(size, n))}
                if rows and "s_per_image" in rows[0]:
                    measured["speedup_vs_1"] = round(
                        rows[0]["s_per_image"] / measured["s_per_image"], 2
                    )
                rows.append(measured)
            series[f"{size[0]}x{size[1]}"] = rows
        return {"series": series}

    def lora(self) -> dict:
        """Two rank-32 adapters: first load (read + inject), s/image with one, and the time to
        switch sets between calls (activating another set, or none)."""
        import dataclasses
        import tempfile

        from serve_app.contract import AdapterRef
        from serve_app.lora_synthetic import write_adapter

        engine = self.loaded
        row: dict = {"rank": LORA_RANK}
        with tempfile.TemporaryDirectory() as folder:
            loads = []
            for seed, name in enumerate(("bench-a", "bench-b")):
                path = f"{folder}/{name}.safetensors"
                write_adapter(engine.pipe.transformer, path, rank=LORA_RANK, seed=seed)
                started = time.perf_counter()
                state = engine.read_adapter(name, path)
                read_s = time.perf_counter() - started
                engine.add_adapter(name, state)
                loads.append((read_s, time.perf_counter() - started - read_s))
        row["first_load_s"] = round(sum(loads[0]), 3)
        row["read_s"], row["inject_s"] = round(loads[0][0], 3), round(loads[0][1], 3)
        job = dataclasses.replace(self.job(self.size), adapters=(AdapterRef("bench-a", 1.0),))
        row["text_to_image"] = self.time_job(job)
        sets = [(AdapterRef("bench-a", 1.0),), (AdapterRef("bench-b", 0.8),),
                (AdapterRef("bench-a", 0.5), AdapterRef("bench-b", 0.5)), ()]  # fmt: skip
        started = time.perf_counter()
        switches = 20
        for index in range(switches):
            engine._activate_adapters(dataclasses.replace(job, adapters=sets[index % 4]))
        row["switch_ms"] = round((time.perf_counter() - started) / switches * 1000, 2)
        engine.remove_adapters(["bench-a", "bench-b"])
        return row

    def compile(self) -> None:
        self.loaded.pipe.transformer.compile_repeated_blocks(fullgraph=True)

    def fp8(self) -> dict:
        from serve_app.engine import ModelLoadError

        try:
            self.load(quantization="fp8", compile=True)
        except ModelLoadError as exc:
            self.unload()
            return {"error": str(exc)}
        return {"load_s": self.load_s, **self.switch()()}

    # -- output ---------------------------------------------------------------------------
    def result(self) -> dict:
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": self.machine,
            "settings": {
                "source": self.args.source,
                "size": self.args.size,
                "small_size": self.args.small_size,
                "steps": self.args.steps,
                "repeat": self.args.repeat,
                "budget_s": self.args.budget_s,
                "peak_bf16_tflops": self.peak_tflops,
            },
            "rows": self.rows,
            "table": self.table(),
        }

    def write(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        result = self.result()
        out.write_text(json.dumps(result, indent=2))
        out.with_suffix(".md").write_text(result["table"] + "\n")

    def table(self) -> str:
        return table(self.rows, self.machine, self.args, self.peak_tflops)


def _enable_cache(transformer) -> None:
    from diffusers import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=CACHE_THRESHOLD))


def run(args) -> dict:
    return Bench(args).run()
