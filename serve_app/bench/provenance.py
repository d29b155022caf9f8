"""What provenance costs per image: `python -m serve_app.bench provenance`.

Per output format, on one `--size` image (default 1024x1024, the server's default compression
100: PNG compress_level 1, JPEG quality 95, lossless WebP), the median over `--repeats` of:
- `encode_image` without marks (the codec as it was);
- `encode_image` with the marks (XMP DigitalSourceType + EXIF Software): the added ms, paired
  with the unmarked call just before (interleaved), and the µs to build the XMP/EXIF blocks;
- C2PA signing of the marked bytes (`C2paSigner.sign`, ES256, no TSA, no thumbnail) for a
  generation, and for an edit with one input image as a PNG ingredient (hashed into the
  manifest), with a throwaway identity made in a temp dir (`serve_app.provenance_certs`);
- the bytes each adds.

The image is smooth gradients plus mild noise (closer to a generated image than pure noise, which
would make every encoder slower). C2PA needs `c2pa-python` (the `c2pa` extra); without it those
columns are skipped. Writes `provenance.json` and `provenance.md` in `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

FORMATS = ("png", "jpeg", "webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="results/provenance", help="output directory")
    parser.add_argument("--size", type=int, default=1024, help="square image side in pixels")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    parser.add_argument("--compression", type=int, default=100, help="output_compression")
    parser.add_argument("--no-c2pa", action="store_true", help="skip C2PA signing")


def test_image(size: int) -> Any:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(0)
    channels = [
        200 * x + 40 * np.sin(12 * y),
        180 * y + 50 * np.cos(9 * x * y),
        120 + 100 * np.sin(6 * (x + y)),
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up (imports, first allocation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def paired_ms(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[list[float], list[float]]:
    """Interleaved timings (ms) of two calls, so drift on a shared machine hits both alike."""
    first(), second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for call, times in ((first, a), (second, b)):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000)
    return a, b


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from serve_app.codec import encode_image
    from serve_app.config.provenance import C2paConfig, ProvenanceConfig
    from serve_app.provenance import provenance_for, save_params

    image = test_image(args.size)
    model = "black-forest-labs/FLUX.1-Kontext-dev"
    generated = provenance_for(ProvenanceConfig(), model, edit=False, composite=False)
    edited = provenance_for(ProvenanceConfig(), model, edit=True, composite=False)
    assert generated and edited
    signer = None
    c2pa_version = None
    if not args.no_c2pa:
        try:
            import c2pa
        except ImportError:
            print("c2pa-python is not installed: C2PA columns skipped (pip install '.[c2pa]')")
        else:
            from serve_app.provenance import C2paSigner
            from serve_app.provenance_certs import make_signing_identity

            c2pa_version = c2pa.__version__
            chain, key, _ = make_signing_identity(tempfile.mkdtemp(prefix="bench-c2pa-"))
            signer = C2paSigner(C2paConfig(cert_file=str(chain), key_file=str(key)))
    ingredient = encode_image(image.rotate(90), "png")
    rows: list[dict[str, Any]] = []
    for fmt in FORMATS:
        plain = encode_image(image, fmt, args.compression)
        marked = encode_image(image, fmt, args.compression, provenance=generated)
        encode_ms, marked_ms = paired_ms(
            partial(encode_image, image, fmt, args.compression),
            partial(encode_image, image, fmt, args.compression, provenance=generated),
            args.repeats,
        )
        row: dict[str, Any] = {
            "format": fmt,
            "encode_ms": statistics.median(encode_ms),
            "marked_ms": statistics.median(marked_ms),
            # Paired: each marked call against the unmarked call just before it.
            "marks_added_ms": statistics.median(
                m - e for e, m in zip(encode_ms, marked_ms, strict=True)
            ),
            # Building the XMP packet and EXIF block alone (Pillow then writes them as chunks).
            "marks_build_us": 1000
            * median_ms(partial(save_params, generated, fmt), max(args.repeats, 200)),
            "bytes": len(plain),
            "marks_bytes": len(marked) - len(plain),
        }
        if signer is not None:
            row["c2pa_ms"] = median_ms(partial(signer.sign, marked, fmt, generated), args.repeats)
            row["c2pa_edit_ms"] = median_ms(
                partial(signer.sign, marked, fmt, edited, [ingredient]), args.repeats
            )
            row["c2pa_bytes"] = len(signer.sign(marked, fmt, generated)) - len(marked)
        rows.append(row)
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "size": args.size,
        "compression": args.compression,
        "repeats": args.repeats,
        "c2pa_python": c2pa_version,
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    c2pa = result["c2pa_python"] is not None
    head = "| format | encode ms | + marks ms (paired) | marks built µs | marks bytes |"
    rule = "|---|---|---|---|---|"
    if c2pa:
        head += " C2PA sign ms (generation) | C2PA sign ms (edit, 1 ingredient) | C2PA bytes |"
        rule += "---|---|---|"
    lines = [
        f"{result['size']}x{result['size']}, compression {result['compression']}, median of "
        f"{result['repeats']}, {result['date']}, c2pa-python {result['c2pa_python']}",
        "",
        head,
        rule,
    ]
    for row in result["rows"]:
        line = (
            f"| {row['format']} | {row['encode_ms']:.1f} | {row['marks_added_ms']:+.2f} | "
            f"{row['marks_build_us']:.0f} | {row['marks_bytes']} |"
        )
        if c2pa:
            line += f" {row['c2pa_ms']:.1f} | {row['c2pa_edit_ms']:.1f} | {row['c2pa_bytes']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_result(out: Path, name: str, result: dict[str, Any], table: str) -> None:
    """`<name>.json` and `<name>.md` in `out`; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)


def run(args: argparse.Namespace) -> None:
    result = measure(args)
    write_result(Path(args.out), "provenance", result, markdown(result))
