"""Seconds per image, speed-ups and peak memory of the speed switches and of batches: `python -m
serve_app.bench gpu` (what `scripts/gpu-check.sh` runs on a lent GPU).

In-process (no Ray, no HTTP): the engine the model deployment runs, at the size and steps asked,
text-to-image and a single-image edit. Steps, headline rows first, each skipped with the reason
once the time budget could not hold it:

1. plain: the dtype's eager path (bf16 on a GPU);
2. compile: regional compile of the same weights, in place (`speed.compile_transformer`);
3. fp8-compile: fp8 + compile on freshly built weights, as `speed.quantization: fp8` and
   `speed.compile: true` load them;
4. then, on fresh plain weights: batches of text-to-image at the large and small sizes; LoRA (a
   first adapter load: read, inject; seconds per image with it; the cost of switching adapter
   sets between calls); the first-block cache; each attention backend (each undone after);
5. fp8-compile-cache: fp8 + the first-block cache + compile, loaded as the engine loads that
   config (the cache is enabled before compiling, with graph breaks allowed around its hook).

Every estimate comes from this run's own measurements: the plain seconds per image predict the
eager steps, the compile time measured in `compile` predicts the fp8 compile, the fp8 row's
load and compile predict the last row; before anything is measured a stated prior is used.
Every measurement warms its exact shape up first (a short call; for compile, the compilation)
and records the peak GPU memory of its timed calls. Results are written after every step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.bench.gpu_table import peak_tflops, table
from serve_app.bench.machine import Budget, bench_job, describe

if TYPE_CHECKING:
    from serve_app.engine import ImageEngine

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
    "compile",
    "fp8-compile",
    "batches",
    "lora",
    "cache",
    "attention",
    "fp8-compile-cache",
)
CACHE_THRESHOLD = 0.08
# Compile seconds (both shapes) assumed until this run has measured one: FLUX's regional compile
# on an H100 took minutes in the worst report, the tiny model's on a CPU tens of seconds.
COMPILE_PRIOR_S = {"cuda": 150.0, "cpu": 60.0}
FP8_COMPILE_FACTOR = 1.3  # fp8's quantized linears give inductor more to compile than bf16's
LOAD_FP8_FACTOR = 1.5  # an fp8 load: the plain load, then a quantizing pass over the weights
MARGIN = 1.15  # on every estimate: timing noise, allocator warm-up
LORA_EXTRA_S = 10.0  # writing, reading and injecting two rank-32 adapters (synthetic files)
LORA_RANK = 32  # typical of published FLUX LoRAs (16-64), on every attention projection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="synthetic", help="synthetic, tiny, hub id or dir")
    parser.add_argument(
        "--family",
        default="flux-kontext",
        help="model family (docs/api.md): flux-kontext, flux, flux2-klein, qwen-image, "
        "qwen-image-edit; switches the family does not run are skipped, saying so",
    )
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
    parser.add_argument(
        "--fp8-unavailable",
        default=None,
        metavar="REASON",
        help="skip the fp8 rows with this reason (gpu-check.sh: torchao does not import here)",
    )
    parser.add_argument("--out", default="results/gpu.json", help="JSON results; .md beside it")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds a step is expected to take, and what that figure rests on (shown when skipped)."""

    seconds: float
    basis: str

    def __add__(self, other: Estimate) -> Estimate:
        basis = " + ".join(b for b in (self.basis, other.basis) if b)
        return Estimate(self.seconds + other.seconds, basis)


NOTHING = Estimate(0.0, "")


@dataclasses.dataclass
class Speeds:
    """Measured seconds per image of one configuration, text-to-image and edit."""

    t2i_s: float
    edit_s: float
    label: str


class Bench:
    def __init__(self, args) -> None:
        from serve_app.families import traits
        from serve_app.geometry import parse_wxh

        self.args = args
        self.family = traits(getattr(args, "family", "flux-kontext"))
        # A family without generations (an edit-only model) measures edits where the others
        # measure text-to-image.
        self.edits_only = not self.family.serves("generations")
        self.size = parse_wxh(args.size)
        self.small_size = parse_wxh(args.small_size)
        self.budget = Budget(args.budget_s)
        self.machine = describe()
        self.peak_tflops = args.peak_tflops or peak_tflops(self.machine.get("gpu"))
        self.rows: list[dict] = []
        self.engine: ImageEngine | None = None
        self.weights: str | None = None  # what the engine holds: plain, compiled, fp8...
        self.flops: dict[tuple[int, int, int], int] = {}
        # This run's measurements, to estimate the steps after them.
        self.load_s: float | None = None  # the last load
        self.plain_load_s: float | None = None
        self.speeds: dict[str, Speeds] = {}  # plain, compile, fp8-compile
        self.compile_s: dict[str, float] = {}  # compile, fp8-compile: compile seconds measured
        self.fp8_load_s: float | None = None

    # -- engine ---------------------------------------------------------------------------
    def load(self, weights: str = "plain", **speed) -> None:
        from serve_app.config import ModelConfig, SpeedConfig
        from serve_app.engine import ImageEngine

        self.unload()
        width, height = self.size
        self.config = ModelConfig(
            id="bench",
            family=self.family.name,  # type: ignore[arg-type]  # checked by traits()
            source=self.args.source,
            speed=SpeedConfig.model_validate(speed),
            warmup=False,
            min_side=16,
            max_side=4096,
            max_pixels=4096 * 4096,
            default_size=f"{width}x{height}",
        )
        engine = ImageEngine(self.config)
        started = time.perf_counter()
        engine.load()
        self.load_s = round(time.perf_counter() - started, 2)
        self.engine, self.weights = engine, weights
        if weights == "plain" and self.plain_load_s is None:
            self.plain_load_s = self.load_s

    def use_plain(self) -> None:
        """Eager weights with no switch on (reloaded after compile or fp8 replaced them)."""
        if self.weights != "plain":
            self.load()

    @property
    def loaded(self) -> ImageEngine:
        if self.engine is None:
            raise RuntimeError("no engine: load() first")
        return self.engine

    def unload(self) -> None:
        import torch

        self.engine, self.weights = None, None
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
        """Warm the shape up with a 2-step call (compiling, where compiled), then time `repeat`
        calls: median seconds per image, the warm-up's seconds, peak GPU memory, and model FLOP
        utilisation where the GPU's peak is known."""
        import torch

        cuda = torch.cuda.is_available()
        started = time.perf_counter()
        self.loaded.generate([dataclasses.replace(job, steps=2)])
        if cuda:
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.args.repeat):
            started = time.perf_counter()
            self.loaded.generate([job])
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        seconds = statistics.median(times) / job.n
        result = {"s_per_image": round(seconds, 4), "warmup_s": round(warmup_s, 2)}
        result["peak_memory_gib"] = (
            round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        )
        flops = self.flops_per_image(job)
        result["flops_per_image"] = flops
        if self.peak_tflops and flops is not None:
            result["mfu"] = round(flops / seconds / (self.peak_tflops * 1e12), 3)
        return result

    def flops_per_image(self, job) -> int | None:
        """The loaded transformer's FLOPs for one image of `job`, all steps (meta device), for
        the FLUX.1 families (one forward a step: `synthetic.flops_per_step`); None for the
        others (other transformers, and true CFG's two passes), whose rows then have no MFU."""
        from serve_app.synthetic import flops_per_step

        if self.family.name not in ("flux-kontext", "flux"):
            return None
        # FLUX.1 [dev] edits by image-to-image: its input adds no tokens to the sequence.
        tokens_of_input = self.family.conditioning == "reference"
        key = (job.width, job.height, len(job.conditioning) if tokens_of_input else 0)
        if key not in self.flops:
            config = {
                k: v
                for k, v in self.loaded.pipe.transformer.config.items()
                if not k.startswith("_")
            }
            self.flops[key] = flops_per_step(
                job.width,
                job.height,
                key[2],
                self.config.max_sequence_length,
                config,
            )
        return self.flops[key] * job.steps

    # -- estimates (from what this run measured so far) -----------------------------------
    @property
    def device(self) -> str:
        return "cuda" if self.machine.get("gpu") else "cpu"

    def work(self, speeds: Speeds | None, t2i: float = 1, edit: float = 1) -> Estimate:
        """`t2i` text-to-images and `edit` edits at `speeds`, `repeat` timed calls and a 2-step
        warm-up each."""
        if speeds is None:
            return Estimate(0.0, "no plain measurement")
        per_call = t2i * speeds.t2i_s + edit * speeds.edit_s
        calls = self.args.repeat + 2 / self.args.steps
        return Estimate(
            per_call * calls * MARGIN,
            f"{t2i:g} t2i + {edit:g} edit at {speeds.label} "
            f"{speeds.t2i_s:.1f}/{speeds.edit_s:.1f} s",
        )

    def reload_plain(self) -> Estimate:
        if self.weights == "plain" or self.plain_load_s is None:
            return NOTHING
        return Estimate(self.plain_load_s * MARGIN, f"reload {self.plain_load_s:.0f} s")

    def compile_estimate(self, measured_in: str = "compile", factor: float = 1.0) -> Estimate:
        if measured_in in self.compile_s:
            seconds = self.compile_s[measured_in]
            return Estimate(
                seconds * factor * MARGIN,
                f"compile {seconds:.0f} s measured in {measured_in}"
                + (f" x{factor:g}" if factor != 1 else ""),
            )
        if "compile" in self.compile_s:
            return self.compile_estimate("compile", FP8_COMPILE_FACTOR)
        prior = COMPILE_PRIOR_S[self.device] * factor
        return Estimate(prior, f"compile prior {prior:.0f} s (none measured yet)")

    def estimate_compile(self) -> Estimate:
        return self.work(self.speeds.get("plain")) + self.compile_estimate()

    def estimate_fp8(self) -> Estimate:
        load = NOTHING
        if self.plain_load_s is not None:
            seconds = self.plain_load_s * LOAD_FP8_FACTOR
            load = Estimate(seconds, f"load {seconds:.0f} s (plain x{LOAD_FP8_FACTOR:g})")
        compiled = self.speeds.get("compile") or self.speeds.get("plain")
        return load + self.compile_estimate("compile", FP8_COMPILE_FACTOR) + self.work(compiled)

    def estimate_fp8_cache(self) -> Estimate:
        if self.fp8_load_s is None:  # fp8-compile not measured: the same guess as for it
            return self.estimate_fp8()
        load = Estimate(self.fp8_load_s * MARGIN, f"load {self.fp8_load_s:.0f} s (fp8 row)")
        speeds = self.speeds.get("fp8-compile") or self.speeds.get("plain")
        return load + self.compile_estimate("fp8-compile") + self.work(speeds)

    def batch_estimate(self, size: tuple[int, int], n: int) -> Estimate:
        """`n` text-to-images at `size`: the plain full-size seconds scaled by tokens."""
        plain = self.speeds.get("plain")
        if plain is None:
            return Estimate(0.0, "no plain measurement")
        text = self.config.max_sequence_length

        def tokens(wh: tuple[int, int]) -> float:
            return wh[0] * wh[1] / 256 + text

        scale = tokens(size) / tokens(self.size)
        seconds = n * plain.t2i_s * scale * (self.args.repeat + 2 / self.args.steps) * MARGIN
        return Estimate(seconds, f"{n} x {plain.t2i_s * scale:.1f} s")

    def estimate_batches(self) -> Estimate:
        seconds = sum(
            self.batch_estimate(size, n).seconds
            for size, counts in self.batch_series()
            for n in self.batch_sizes(counts)
        )
        return self.reload_plain() + Estimate(seconds, "batches at plain s/image by tokens")

    # -- steps ----------------------------------------------------------------------------
    def step(
        self,
        name: str,
        estimate: Callable[[], Estimate],
        run: Callable[[], dict],
        skip: str | None = None,
    ) -> None:
        """Run one step unless `skip` (the reason) or the budget cannot hold its estimate;
        record whatever happens."""
        if name.split(":")[0] not in self.only:
            return
        row: dict = {"step": name}
        expected = estimate() if skip is None else NOTHING
        if skip is not None:
            row["skipped"] = skip
        elif self.budget.left() < expected.seconds:
            row["skipped"] = (
                f"time budget: {self.budget.left():.0f}s left, needs ~{expected.seconds:.0f}s "
                f"({expected.basis})"
            )
        else:
            started = time.perf_counter()
            try:
                row.update(run())
            except Exception as exc:  # noqa: BLE001 - a step failing here is a result too
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["wall_s"] = round(time.perf_counter() - started, 1)
            row["estimate_s"] = round(expected.seconds, 1)
        self.rows.append(row)
        self.write()

    def measure(self, label: str | None = None) -> dict:
        """Text-to-image (where the family serves it) and an edit at the full size on the
        loaded weights; `label`: remember the speeds (and any compile seconds in the warm-ups)
        to estimate later steps."""
        row = {} if self.edits_only else {"text_to_image": self.time_job(self.job(self.size))}
        row["edit"] = self.time_job(self.job(self.size, edit=True))
        if label is not None:
            edit = row["edit"]["s_per_image"]
            t2i = row["text_to_image"]["s_per_image"] if "text_to_image" in row else edit
            self.speeds[label] = Speeds(t2i, edit, label)
        return row

    def measure_compiled(self, label: str) -> dict:
        """`measure`, and the compile seconds: the warm-ups less what 2 steps take compiled."""
        row = self.measure(label)
        kinds = [kind for kind in ("text_to_image", "edit") if kind in row]
        warm = sum(row[kind]["warmup_s"] for kind in kinds)
        two_steps = sum(row[kind]["s_per_image"] for kind in kinds)
        row["compile_s"] = round(max(warm - two_steps * 2 / self.args.steps, 0.0), 1)
        self.compile_s[label] = row["compile_s"]
        return row

    def run(self) -> dict:
        self.only = {s.strip() for s in self.args.only.split(",") if s.strip()}
        unknown = self.only - set(STEPS)
        if unknown:
            raise SystemExit(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
        fp8_skip = self.unsupported("quantization") or self.fp8_unavailable()
        cache_skip = self.unsupported("first_block_cache_threshold")

        self.load()
        self.step("plain", lambda: NOTHING, self.plain)
        self.step("compile", self.estimate_compile, self.compile, self.unsupported("compile"))
        self.step("fp8-compile", self.estimate_fp8, self.fp8_compile, fp8_skip)
        self.step("batches", self.estimate_batches, self.batches)
        self.step(
            "lora",
            lambda: (
                self.reload_plain()
                + self.work(self.speeds.get("plain"), 1, 0)
                + Estimate(LORA_EXTRA_S, "adapters")
            ),
            self.lora,
        )
        self.step(
            "cache",
            lambda: self.reload_plain() + self.work(self.speeds.get("plain")),
            self.cache,
            cache_skip,
        )
        for backend in ATTENTION_BACKENDS:
            self.step(
                f"attention:{backend}",
                lambda: self.reload_plain() + self.work(self.speeds.get("plain")),
                self.attention(backend),
                self.unsupported("attention_backend"),
            )
        fp8_row = next((r for r in self.rows if r["step"] == "fp8-compile"), None)
        if fp8_skip is None and fp8_row is not None and "error" in fp8_row:
            fp8_skip = f"fp8-compile failed: {fp8_row['error'][:200]}"
        self.step(
            "fp8-compile-cache",
            self.estimate_fp8_cache,
            self.fp8_compile_cache,
            fp8_skip or cache_skip,
        )
        self.unload()
        print(self.table())
        print(f"\nwrote {self.args.out} and {Path(self.args.out).with_suffix('.md')}")
        return self.result()

    def unsupported(self, switch: str) -> str | None:
        """Why the family does not run `switch` (`FamilyTraits.speed_switches`), or None."""
        if switch in self.family.speed_switches:
            return None
        return f"speed.{switch} is not a switch of family {self.family.name} (refused at config)"

    def fp8_unavailable(self) -> str | None:
        """Why the fp8 rows cannot run here, or None."""
        if self.args.fp8_unavailable:
            return self.args.fp8_unavailable
        import torch

        if not torch.cuda.is_available():
            return "fp8 needs a CUDA GPU (torchao float8, compute capability >= 8.9); none here"
        major, minor = torch.cuda.get_device_capability(0)
        if (major, minor) < (8, 9):
            return f"fp8 needs compute capability >= 8.9; this GPU has {major}.{minor}"
        if importlib.util.find_spec("torchao") is None:
            return "fp8 needs torchao, which is not installed here"
        return None

    def plain(self) -> dict:
        self.use_plain()
        return {"load_s": self.load_s, **self.measure("plain")}

    def compile(self) -> dict:
        """Regional compile of the plain weights, in place, as `speed.compile: true` does."""
        from serve_app.speed import compile_transformer

        self.use_plain()
        compile_transformer(self.loaded.pipe.transformer, cache_enabled=False)
        self.weights = "compiled"
        return self.measure_compiled("compile")

    def fp8_compile(self) -> dict:
        self.load("fp8", quantization="fp8", compile=True)
        self.fp8_load_s = self.load_s
        return {"load_s": self.load_s, **self.measure_compiled("fp8-compile")}

    def fp8_compile_cache(self) -> dict:
        """Loaded as the engine loads this config: the cache is enabled before the compile
        (`compile_transformer(cache_enabled=True)`: graph breaks around the cache's hook)."""
        self.load(
            "fp8-cache",
            quantization="fp8",
            compile=True,
            first_block_cache_threshold=CACHE_THRESHOLD,
        )
        return {"load_s": self.load_s, **self.measure_compiled("fp8-compile-cache")}

    def batch_series(self) -> list[tuple[tuple[int, int], str]]:
        return [(self.size, self.args.batches), (self.small_size, self.args.small_batches)]

    def batch_sizes(self, text: str) -> list[int]:
        return [int(n) for n in text.split(",") if n.strip()]

    def batches(self) -> dict:
        self.use_plain()
        series = {}
        for size, counts in self.batch_series():
            rows: list[dict] = []
            for n in self.batch_sizes(counts):
                expected = self.batch_estimate(size, n)
                if rows and self.budget.left() < expected.seconds:
                    rows.append(
                        {
                            "n": n,
                            "skipped": f"time budget: {self.budget.left():.0f}s left, needs "
                            f"~{expected.seconds:.0f}s ({expected.basis})",
                        }
                    )
                    continue
                measured = {"n": n, **self.time_job(self.job(size, n, edit=self.edits_only))}
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
        import tempfile

        from serve_app.contract import AdapterRef
        from serve_app.lora_synthetic import write_adapter

        self.use_plain()
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
        job = dataclasses.replace(
            self.job(self.size, edit=self.edits_only), adapters=(AdapterRef("bench-a", 1.0),)
        )
        row["edit" if self.edits_only else "text_to_image"] = self.time_job(job)
        sets = [(AdapterRef("bench-a", 1.0),), (AdapterRef("bench-b", 0.8),),
                (AdapterRef("bench-a", 0.5), AdapterRef("bench-b", 0.5)), ()]  # fmt: skip
        started = time.perf_counter()
        switches = 20
        for index in range(switches):
            engine._activate_adapters(dataclasses.replace(job, adapters=sets[index % 4]))
        row["switch_ms"] = round((time.perf_counter() - started) / switches * 1000, 2)
        engine.remove_adapters(["bench-a", "bench-b"])
        return row

    def cache(self) -> dict:
        """The first-block cache on the eager weights (disabled again after)."""
        self.use_plain()
        transformer = self.loaded.pipe.transformer
        _enable_cache(transformer)
        try:
            return self.measure()
        finally:
            if transformer.is_cache_enabled:
                transformer.disable_cache()

    def attention(self, backend: str) -> Callable[[], dict]:
        def run() -> dict:
            self.use_plain()
            transformer = self.loaded.pipe.transformer
            try:
                transformer.set_attention_backend(backend)
                return self.measure()
            finally:
                transformer.set_attention_backend("native")

        return run

    # -- output ---------------------------------------------------------------------------
    def result(self) -> dict:
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": self.machine,
            "settings": {
                "family": self.family.name,
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
