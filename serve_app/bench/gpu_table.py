"""The Markdown table of `python -m serve_app.bench gpu`'s results, and the GPU peaks its model
FLOP utilisation (MFU) is measured against."""

from __future__ import annotations

import datetime

from serve_app.bench.machine import device_label

# Dense bf16 peak of known GPUs (vendor figures, no sparsity), for model FLOP utilisation.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
}


def peak_tflops(gpu: str | None) -> float | None:
    """The dense bf16 peak of a known GPU (by name), else None."""
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if gpu and name in gpu:
            return tflops
    return None


def _cell(measured: dict | None, key: str = "s_per_image", digits: int = 3) -> str:
    if not measured or measured.get(key) is None:
        return "—"
    return f"{measured[key]:.{digits}f}"


def table(rows: list[dict], machine: dict, args, peak_tflops: float | None) -> str:
    """Markdown: the switches (seconds per image, speed-up over plain, peak memory, MFU), then
    the batch series (seconds per image, speed-up over batch 1, peak memory)."""
    plain = next(
        (r for r in rows if r["step"] == "plain" and "error" not in r and "skipped" not in r), None
    )
    today = datetime.date.today().isoformat()
    lines = [
        f"{device_label(machine)} | torch {machine['torch']} | {today} | source {args.source} | "
        f"{args.size}, {args.steps} steps | median of {args.repeat}"
        + (f" | MFU vs {peak_tflops:.0f} TFLOP/s bf16" if peak_tflops else ""),
        "",
        "| step | text-to-image s/image | edit s/image | speed-up (t2i) | peak GiB "
        "| MFU t2i / edit | note |",
        "|---|---|---|---|---|---|---|",
    ]
    batch_rows = []
    for row in rows:
        if row["step"] == "batches" and "series" in row:
            batch_rows.append(row)
            continue
        note = row.get("error") or row.get("skipped") or ""
        t2i, edit = row.get("text_to_image"), row.get("edit")
        speedup = "—"
        if t2i and plain:
            speedup = f"{plain['text_to_image']['s_per_image'] / t2i['s_per_image']:.2f}x"
        peak = max(
            (m["peak_memory_gib"] for m in (t2i, edit) if m and m.get("peak_memory_gib")),
            default=None,
        )
        mfu = f"{_cell(t2i, 'mfu', 2)} / {_cell(edit, 'mfu', 2)}" if t2i else "—"
        if "load_s" in row:
            note = (note + f" load {row['load_s']:.0f} s").strip()
        if "compile_s" in row:
            note = (note + f" compile {row['compile_s']:.0f} s").strip()
        if "first_load_s" in row:
            note = (
                f"{note} rank-{row['rank']} adapter: first load {row['first_load_s']:.2f} s "
                f"(read {row['read_s']:.2f}, inject {row['inject_s']:.2f}); switching sets "
                f"between calls {row['switch_ms']:.1f} ms"
            ).strip()
        note = note.replace("|", "/").replace("\n", " ")[:200]
        lines.append(
            f"| {row['step']} | {_cell(t2i)} | {_cell(edit)} | {speedup} | "
            f"{'—' if peak is None else f'{peak:.1f}'} | {mfu} | {note} |"
        )
    for row in batch_rows:
        lines += [
            "",
            "| text-to-image batch | n | s/image | speed-up vs n=1 | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for size, series in row["series"].items():
            for measured in series:
                lines.append(
                    f"| {size} | {measured['n']} | {_cell(measured)} | "
                    f"{measured.get('speedup_vs_1', '—' if measured['n'] != 1 else '1.00')} | "
                    f"{_cell(measured, 'peak_memory_gib', 1)} |"
                )
    return "\n".join(lines)
