"""Plan FLUX.1-Kontext-dev's peak device memory and FLOPs per call on a CPU, with fake tensors.

    python -m serve_app.bench plan [--out results/plan]

Builds the real architecture under `FakeTensorMode` (no weights allocated) once per (weights,
LoRA rank) variant and walks the engine's call phase by phase (`serve_app.memory_plan`). Walking
is seconds per call, so not every case is walked: the `--measure-sizes` at the
`--measure-batches` are (`method: measured`); every other case is `extrapolated` from them.
Each phase's live bytes are affine in the batch, the pixels of one image and the pixels of the
call (activations scale with tokens, the one-image-at-a-time VAE encode with an image's pixels,
the prompt embeddings with the batch), so each phase is fitted by least squares in
[1, batch, pixels, batch x pixels] over the measured calls, and an extrapolated peak is the
weights plus the largest fitted phase. FLOPs per image (28 steps) are counted on the bf16 model
at batch 1 for the measured sizes, and fitted elsewhere: a step's FLOPs as c + a S + b S^2 in the
sequence length S (linear layers and attention), the rest as d + e x pixels per task. fp8 rows
reuse the bf16 FLOPs (the same matmuls).

Writes `plan.json` (rows, max batch per GPU at `HEADROOM`), `plan.md` and `plan.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app import memory_plan as mp
from serve_app.families import FAMILIES
from serve_app.geometry import parse_wxh
from serve_app.memory_fit import HEADROOM

GIB = 2**30
HEADLINE = ("512x512", "1024x1024")


@dataclass(frozen=True)
class PlannedFamily:
    """What the plan needs of a model family: its name in plans, the tasks it runs, how to
    build its full-size components (dtype, weights, LoRA rank) and walk one call, its text
    context, the image tokens of a call, and the transformer fields a replica checks."""

    model: str
    tasks: dict[str, int]
    build: Callable[[Any, str, int], dict[str, Any]]
    walk: Callable[..., None] | None  # None: memory_plan.walk_call (FLUX.1)
    text_tokens: int
    image_tokens: Callable[[int, int, int], int]
    architecture: Callable[[], dict[str, Any]]
    weights: tuple[str, ...]  # the weight formats the family serves (fp8: a speed switch)
    method: str
    sizes: tuple[str, ...] = ()  # the family's preferred sizes (default: Kontext's)


def _preferred_sizes(family: str) -> tuple[str, ...]:
    return tuple(FAMILIES[family].defaults["preferred_resolutions"])


def _flux_build(source: str) -> Callable[[Any, str, int], dict[str, Any]]:
    return lambda dtype, weights, rank: mp.build_model(
        mp.component_configs(source), dtype, weights, rank
    )


def planned_family(family: str, source: str = "synthetic") -> PlannedFamily:
    """The plan's view of `family` (`flux-kontext`, `flux`, `flux2-klein`, `qwen-image`,
    `qwen-image-edit`, every family served);
    `source` (FLUX.1 only) picks the configs: synthetic, tiny or a diffusers directory."""
    if family in ("flux-kontext", "flux"):
        kontext = family == "flux-kontext"
        return PlannedFamily(
            model=mp.MODEL if kontext else "FLUX.1-dev",
            # FLUX.1 [dev] runs text-to-image with exactly Kontext's shapes; its edits are
            # image-to-image (no conditioning tokens), so it plans generations only.
            tasks=dict(mp.TASKS) if kontext else {"generations": 0},
            build=_flux_build(source),
            walk=None,
            text_tokens=mp.TEXT_TOKENS,
            image_tokens=mp.image_tokens_in_call,
            architecture=lambda: mp.architecture(mp.component_configs(source)),
            weights=("bf16", "fp8"),
            method=(
                "FakeTensorMode walk of the engine call (text encoders, VAE encode per image, "
                "one denoising step with the previous step's output live = every step of 28, "
                "VAE decode); peak = weights + max live storage bytes. extrapolated: per-phase "
                "least squares in [1, batch, pixels, batch*pixels] over the measured calls. "
                "fp8: torchao Float8DynamicActivationFloat8Weight emulated by a stand-in Linear "
                "(1-byte weight + scale, transient fp8 input copy, bf16 output). edits-N: N "
                "images of the output's aspect stitched and resized to the nearest Kontext "
                "bucket (~1 MP), as the engine conditions."
            ),
        )
    if family in ("qwen-image", "qwen-image-edit"):
        from serve_app import memory_plan_qwen as mq

        edit = family == "qwen-image-edit"
        return PlannedFamily(
            model="Qwen-Image-Edit" if edit else "Qwen-Image",
            tasks={"edits-1": 1} if edit else {"generations": 0},
            build=mq.build_model,
            walk=mq.walk_call,
            text_tokens=mq.TEXT_TOKENS,
            image_tokens=mq.image_tokens_in_call,
            architecture=mq.architecture,
            weights=("bf16",),
            sizes=_preferred_sizes(family),
            method=(
                "FakeTensorMode walk of the engine call with true CFG (serve_app/"
                "memory_plan_qwen.py): Qwen2.5-VL text encoder for the prompt and the negative "
                "prompt (edits: the vision tower over the ~1 MP input, windowed attention as "
                "full attention), the VAE encode per input image, one denoising step (two "
                "transformer passes) with the previous velocity live, the 3-D VAE decode; peak "
                "= weights + max live storage bytes; extrapolated as for FLUX.1."
            ),
        )
    if family == "flux2-klein":
        from serve_app import memory_plan_klein as mk

        return PlannedFamily(
            model="FLUX.2-klein-4B",
            tasks=dict(mk.TASKS),
            build=mk.build_model,
            walk=mk.walk_call,
            text_tokens=mk.TEXT_TOKENS,
            image_tokens=mk.image_tokens_in_call,
            architecture=mk.architecture,
            weights=("bf16",),
            sizes=_preferred_sizes(family),
            method=(
                "FakeTensorMode walk of the engine call (serve_app/memory_plan_klein.py): "
                "Qwen3-4B over the prompt padded to 512 tokens (layers 9/18/27 stacked), for "
                "edits the VAE encode of the reference canvas once per call (its tokens repeated "
                "per image), one denoising step with the previous velocity live, the VAE decode; "
                "peak = weights + max live storage bytes; extrapolated as for FLUX.1."
            ),
        )
    raise ValueError(f"no memory plan for family {family!r}")


def default_sizes() -> list[str]:
    from serve_app.config import KONTEXT_RESOLUTIONS

    return list(dict.fromkeys([*HEADLINE, *KONTEXT_RESOLUTIONS]))


def _csv(kind: type) -> Any:
    return lambda text: [kind(item) for item in text.split(",") if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results/plan", help="output directory")
    parser.add_argument(
        "--family",
        default="flux-kontext",
        help="flux-kontext (FLUX.1-Kontext-dev), flux (FLUX.1-dev), flux2-klein, qwen-image, "
        "qwen-image-edit",
    )
    parser.add_argument(
        "--source", default="synthetic", help="synthetic, tiny, or a diffusers model directory"
    )
    parser.add_argument("--tasks", type=_csv(str), default=None, help="default: the family's")
    parser.add_argument("--sizes", type=_csv(str), default=None, help="WxH,... (default: all)")
    parser.add_argument("--batches", type=_csv(int), default=list(range(1, 9)))
    parser.add_argument("--weights", type=_csv(str), default=None, help="default: the family's")
    parser.add_argument("--lora-ranks", type=_csv(int), default=[0, mp.LORA_RANK])
    parser.add_argument("--measure-sizes", type=_csv(str), default=list(HEADLINE))
    parser.add_argument("--measure-batches", type=_csv(int), default=[1, 2, 8])
    parser.add_argument(
        "--commit", action="store_true", help="also write serve_app/data/memory_plan.json"
    )


def _lstsq(features: list[list[float]], values: list[float]) -> list[float]:
    import numpy as np

    solution, *_ = np.linalg.lstsq(np.array(features), np.array(values), rcond=None)
    return [float(v) for v in solution]


def _memory_features(batch: int, pixels: int) -> list[float]:
    return [1.0, float(batch), float(pixels), float(batch * pixels)]


def _sequence(family: PlannedFamily, size: str, conditioning_images: int) -> int:
    return family.text_tokens + family.image_tokens(*parse_wxh(size), conditioning_images)


def max_batch(peaks: dict[int, int], capacity_bytes: int, headroom: float = HEADROOM) -> int:
    """The largest batch whose peak fits in `capacity_bytes x headroom` (0: none fits); batches
    must fit from 1 up (a larger one never fits where a smaller one does not)."""
    best = 0
    for batch in sorted(peaks):
        if peaks[batch] > capacity_bytes * headroom:
            break
        best = batch
    return best


def build_plan(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Walk the measured cases of every variant and extrapolate the rest (module docstring)."""
    import torch

    started = time.perf_counter()
    family = planned_family(getattr(args, "family", "flux-kontext"), args.source)
    args.tasks = args.tasks or list(family.tasks)
    args.weights = args.weights or list(family.weights)
    refused = [t for t in args.tasks if t not in family.tasks] + [
        w for w in args.weights if w not in family.weights
    ]
    if refused:
        raise ValueError(f"{family.model} plans tasks {list(family.tasks)} and weights "
                         f"{list(family.weights)}, not {refused}")  # fmt: skip
    sizes = args.sizes or (
        list(dict.fromkeys([*HEADLINE, *family.sizes])) if family.sizes else default_sizes()
    )
    measure_sizes = args.measure_sizes
    measured: dict[tuple[str, str, int, str, int], dict[str, Any]] = {}
    flops: dict[tuple[str, str, int], int] = {}  # a step's, per image
    other_flops: dict[tuple[str, str, int], int] = {}  # the rest of the call's, per image
    weight_bytes: dict[tuple[str, int], int] = {}
    for rank in args.lora_ranks:
        for weights in ["bf16", "fp8"]:
            if weights not in args.weights and weights != "bf16":  # FLOPs: counted on bf16
                continue
            with mp.fake_mode():
                t0 = time.perf_counter()
                model = family.build(torch.bfloat16, weights, rank)
                weight_bytes[(weights, rank)] = mp.storage_bytes(list(model.values()))
                log(f"built {weights} lora {rank} in {time.perf_counter() - t0:.0f}s")
                for task in args.tasks:
                    k = family.tasks[task]
                    for size in measure_sizes:
                        width, height = parse_wxh(size)
                        if weights == "bf16":
                            counted = mp.measure_call(
                                model, width=width, height=height, batch=1,
                                conditioning_images=k, count_flops=True, walk=family.walk,
                            )  # fmt: skip
                            flops[(task, size, rank)] = counted["flops_step"]
                            other_flops[(task, size, rank)] = counted["flops_other"]
                        if weights not in args.weights:
                            continue
                        for batch in args.measure_batches:
                            result = mp.measure_call(
                                model, width=width, height=height, batch=batch,
                                conditioning_images=k, walk=family.walk,
                            )  # fmt: skip
                            measured[(task, size, batch, weights, rank)] = result
                    log(f"  {task}: {time.perf_counter() - started:.0f}s so far")
                del model

    rows: list[dict[str, Any]] = []
    for weights in args.weights:
        for rank in args.lora_ranks:
            base = weight_bytes[(weights, rank)]
            for task in args.tasks:
                k = family.tasks[task]
                points = [
                    (parse_wxh(size), batch, measured[(task, size, batch, weights, rank)])
                    for size in measure_sizes
                    for batch in args.measure_batches
                ]
                phase_fits = {
                    phase: _lstsq(
                        [_memory_features(b, w * h) for (w, h), b, _ in points],
                        [float(r["phases"][phase]) for _, _, r in points],
                    )
                    for phase in points[0][2]["phases"]
                }
                step_fit = _lstsq(
                    [
                        [1.0, float(s), float(s) ** 2]
                        for t in args.tasks
                        for size in measure_sizes
                        for s in [_sequence(family, size, family.tasks[t])]
                    ],
                    [float(flops[(t, size, rank)]) for t in args.tasks for size in measure_sizes],
                )
                other_fit = _lstsq(
                    [[1.0, float(_pixels(size))] for size in measure_sizes],
                    [float(other_flops[(task, size, rank)]) for size in measure_sizes],
                )
                for size in sizes:
                    width, height = parse_wxh(size)
                    if (task, size, rank) in flops:
                        step = flops[(task, size, rank)]
                        other = other_flops[(task, size, rank)]
                        flops_method = "counted"
                    else:
                        s = _sequence(family, size, k)
                        step = round(step_fit[0] + step_fit[1] * s + step_fit[2] * s * s)
                        other = round(other_fit[0] + other_fit[1] * width * height)
                        flops_method = "fitted"
                    for batch in args.batches:
                        key = (task, size, batch, weights, rank)
                        if key in measured:
                            live, method = measured[key]["peak_live_bytes"], "measured"
                        else:
                            feats = _memory_features(batch, width * height)
                            live = round(
                                max(
                                    sum(c * f for c, f in zip(fit, feats, strict=True))
                                    for fit in phase_fits.values()
                                )
                            )
                            method = "extrapolated"
                        rows.append({
                            "model": family.model, "task": task, "size": size, "batch": batch,
                            "weights": weights, "lora_rank": rank,
                            "peak_bytes": base + live, "peak_gib": round((base + live) / GIB, 3),
                            "weights_bytes": base,
                            "flops_per_image": other + mp.STEPS * step,
                            "method": method, "flops_method": flops_method,
                        })  # fmt: skip

    max_batches: list[dict[str, Any]] = []
    cases: dict[tuple[str, str, str, int], dict[int, int]] = {}
    for row in rows:
        case = (row["task"], row["size"], row["weights"], row["lora_rank"])
        cases.setdefault(case, {})[row["batch"]] = row["peak_bytes"]
    for (task, size, weights, rank), peaks in cases.items():
        max_batches.append({
            "task": task, "size": size, "weights": weights, "lora_rank": rank,
            **{gpu: max_batch(peaks, capacity) for gpu, capacity in mp.GPUS.items()},
        })  # fmt: skip
    return {
        "model": family.model if args.source == "synthetic" else f"{family.model} ({args.source})",
        "family": getattr(args, "family", "flux-kontext"),
        "source": args.source,
        "architecture": family.architecture(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "headroom": HEADROOM,
        "gpus": dict(mp.GPUS),
        "steps": mp.STEPS,
        "text_tokens": family.text_tokens,
        "measured": {"sizes": measure_sizes, "batches": args.measure_batches},
        "method": family.method,
        "runtime_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "max_batch": max_batches,
    }


def _pixels(size: str) -> int:
    width, height = parse_wxh(size)
    return width * height


def markdown(plan: dict[str, Any], size: str = "1024x1024") -> str:
    """The headline table: peak GiB at batch 1, 2, 4, 8 and the max batch per GPU."""
    batches = [b for b in (1, 2, 4, 8) if any(r["batch"] == b for r in plan["rows"])]
    gpus = list(plan["gpus"])
    head = ["task", "weights", "LoRA", *[f"batch {b} (GiB)" for b in batches]]
    head += [f"max batch {gpu}" for gpu in gpus] + [f"fits {gpu} (line)" for gpu in gpus]
    head += ["TFLOP per image"]
    lines = [
        f"# Memory plan: {plan['model']} at {size}, {plan['steps']} steps",
        "",
        f"Peak device memory per pipeline call, planned with fake tensors on torch "
        f"{plan['torch']} ({plan['date']}); max batch at {plan['headroom']:.0%} of "
        + ", ".join(
            f"{gpu} ({capacity * plan['headroom'] / GIB:.1f} of {capacity / GIB:.1f} GiB)"
            for gpu, capacity in plan["gpus"].items()
        )
        + ". `*`: extrapolated. max batch: of the planned batches; fits (line): the "
        "images per call the fitted line (`planned_fit`, what a replica uses, with "
        f"{mp.CONVOLUTION_SCRATCH:.0%} of the per-image part for convolution scratch) allows.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    fits = {(m["task"], m["size"], m["weights"], m["lora_rank"]): m for m in plan["max_batch"]}
    seen = []
    for row in plan["rows"]:
        case = (row["task"], row["size"], row["weights"], row["lora_rank"])
        if row["size"] != size or row["task"] not in ("generations", "edits-1") or case in seen:
            continue
        seen.append(case)
    for case in sorted(seen, key=lambda c: (c[0] != "generations", c[2] != "bf16", c[3])):
        peaks = {
            r["batch"]: f"{r['peak_gib']:.1f}" + ("*" if r["method"] != "measured" else "")
            for r in plan["rows"]
            if (r["task"], r["size"], r["weights"], r["lora_rank"]) == case
        }
        cells = [case[0], case[2], str(case[3]), *[peaks.get(b, "-") for b in batches]]
        cells += [str(fits[case][gpu]) for gpu in gpus]
        width, height = parse_wxh(case[1])
        for capacity in plan["gpus"].values():
            line = mp.planned_fit(plan, case[0], width, height, case[2], case[3], capacity)
            cells.append(str(line.max_images(width, height)) if line else "-")
        flops = next(
            r["flops_per_image"] for r in plan["rows"]
            if (r["task"], r["size"], r["weights"], r["lora_rank"]) == case
        )  # fmt: skip
        cells.append(f"{flops / 1e12:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(plan: dict[str, Any], path: Path, size: str = "1024x1024") -> str | None:
    """Peak GiB vs batch per (task, weights) at `size`, LoRA 0, with each GPU's usable line.
    Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib unavailable ({exc}): no plot"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str, int], list[tuple[int, float]]] = {}
    for row in plan["rows"]:
        if row["size"] == size:
            key = (row["task"], row["weights"], row["lora_rank"])
            lines.setdefault(key, []).append((row["batch"], row["peak_gib"]))
    for (task, weights, rank), points in sorted(lines.items()):
        points.sort()
        style = "-" if rank == 0 else ":"
        label = f"{task} {weights}" + (f" LoRA {rank}" if rank else "")
        ax.plot([b for b, _ in points], [g for _, g in points], style, marker="o", label=label)
    for gpu, capacity in plan["gpus"].items():
        usable = capacity * plan["headroom"] / GIB
        ax.axhline(usable, color="gray", linestyle="--")
        ax.text(1, usable, f" {gpu} x {plan['headroom']}", va="bottom", fontsize=8)
    ax.set_xlabel("images per call")
    ax.set_ylabel("peak GiB")
    ax.set_title(f"{plan['model']} {size}: planned peak memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def committed(plan: dict[str, Any]) -> dict[str, Any]:
    """What replicas read (`memory_plan.COMMITTED_PLAN`): the plan without the per-row extras."""
    keep = ("task", "size", "batch", "weights", "lora_rank", "peak_bytes")
    trimmed = {key: value for key, value in plan.items() if key not in ("rows", "max_batch")}
    trimmed["rows"] = [{key: row[key] for key in keep} for row in plan["rows"]]
    return trimmed


def run(args: argparse.Namespace) -> None:
    plan = build_plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, separators=(",", ":")) + "\n")
    if args.commit:
        path = mp.committed_plan(plan["family"])
        path.write_text(json.dumps(committed(plan), separators=(",", ":")) + "\n")
        print(f"wrote {path}")
    sizes = {row["size"] for row in plan["rows"]}
    size = "1024x1024" if "1024x1024" in sizes else sorted(sizes)[-1]
    table = markdown(plan, size)
    (out / "plan.md").write_text(table)
    skipped = plot(plan, out / "plan.png", size)
    if skipped:
        print(skipped)
    print(table)
    print(f"{len(plan['rows'])} rows in {plan['runtime_s']}s -> {out}")
