"""Where the image check runs, and what it costs: `python -m serve_app.bench moderation`.

The production config's image classifier is `Falconsai/nsfw_image_detection`, a ViT-base/16 at
224x224 (86 M parameters). Weights cannot be downloaded here, so this builds that architecture
with random weights (same config, same processor: the cost does not depend on the weights),
saves it, and loads it through `serve_app.classifiers.load_classifier`, the replica's own path.
On `--size` images (decoded model outputs, default 1024x1024) it times, per image:
- **in the model replica** (what the app does): one batched classifier call over a request's
  images, at batch 1, 4 and 8, on this process's device;
- **as its own Ray deployment**: the same classifier in a Ray actor (what a Serve deployment's
  replica is), the images sent to it and the verdicts back, i.e. the classifier plus shipping
  ~3 MB of pixels per 1024x1024 image between processes (and that shipping alone: an actor
  method that only receives the images).
Also the prompt's term check (a few hundred terms) in µs. Writes `moderation.json` and
`moderation.md` in `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from serve_app.bench.provenance import median_ms, write_result

BATCHES = (1, 4, 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results/moderation", help="output directory")
    parser.add_argument("--size", type=int, default=1024, help="square image side in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--device", default="cpu", help="classifier device (cpu, cuda)")
    parser.add_argument("--no-ray", action="store_true", help="skip the separate-actor timing")


def save_vit_base(directory: Path) -> Path:
    """Falconsai/nsfw_image_detection's architecture (ViT-base/16, 224, labels normal/nsfw)
    with random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config: Any = ViTConfig(  # type: ignore[call-arg]
        image_size=224,
        patch_size=16,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(directory)
    return directory


def noise_images(count: int, size: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from serve_app.classifiers import load_classifier
    from serve_app.config import ClassifierCheck, SafetyConfig
    from serve_app.moderation import Moderation

    source = save_vit_base(Path(tempfile.mkdtemp(prefix="bench-moderation-")) / "vit")
    check = ClassifierCheck(source=str(source), flagged_labels=["nsfw"], threshold=0.85)
    classify = load_classifier(check, "image-classification", args.device)
    images = noise_images(max(BATCHES), args.size)
    rows: list[dict[str, Any]] = []
    for batch in BATCHES:
        ms = median_ms(partial(classify, images[:batch]), args.repeats)
        rows.append({"batch": batch, "in_replica_ms_per_image": ms / batch})
    if not args.no_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            threads = torch.get_num_threads()

            @ray.remote
            class Checker:
                def __init__(self) -> None:
                    torch.set_num_threads(threads)
                    self.classify = load_classifier(check, "image-classification", args.device)

                def check(self, batch: list[Any]) -> list[dict[str, float]]:
                    return self.classify(batch)

                def receive(self, batch: list[Any]) -> int:
                    return len(batch)

            actor: Any = Checker.remote()  # type: ignore[attr-defined]

            def remote_check(batch: list[Any]) -> Any:
                return ray.get(actor.check.remote(batch))

            def remote_send(batch: list[Any]) -> Any:
                return ray.get(actor.receive.remote(batch))

            for row in rows:
                batch = row["batch"]
                ms = median_ms(partial(remote_check, images[:batch]), args.repeats)
                row["own_deployment_ms_per_image"] = ms / batch
                ms = median_ms(partial(remote_send, images[:batch]), args.repeats)
                row["shipping_ms_per_image"] = ms / batch
        finally:
            ray.shutdown()
    terms = [f"term{i} word{i}" for i in range(300)]
    moderation = Moderation(SafetyConfig(enabled=True, blocked_terms=terms))
    prompt = "a photograph of a quiet harbour at dawn, " * 12
    terms_us = 1000 * median_ms(lambda: moderation.check_prompt(prompt, False), 200)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "size": args.size,
        "repeats": args.repeats,
        "classifier": "ViT-base/16 at 224 (Falconsai/nsfw_image_detection's architecture)",
        "rows": rows,
        "terms_300_us": terms_us,
    }


def markdown(result: dict[str, Any]) -> str:
    ray = "own_deployment_ms_per_image" in result["rows"][0]
    head = "| images per check | in the model replica, ms/image |"
    rule = "|---|---|"
    if ray:
        head += " own deployment (Ray actor), ms/image | of which shipping the pixels |"
        rule += "---|---|"
    lines = [
        f"{result['classifier']}, {result['size']}x{result['size']} outputs, {result['device']} "
        f"({result['torch_threads']} threads), median of {result['repeats']}, {result['date']}",
        "",
        head,
        rule,
    ]
    for row in result["rows"]:
        line = f"| {row['batch']} | {row['in_replica_ms_per_image']:.1f} |"
        if ray:
            line += (
                f" {row['own_deployment_ms_per_image']:.1f} | {row['shipping_ms_per_image']:.1f} |"
            )
        lines.append(line)
    lines += ["", f"Prompt check against 300 blocked terms: {result['terms_300_us']:.0f} µs."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> None:
    result = measure(args)
    write_result(Path(args.out), "moderation", result, markdown(result))
