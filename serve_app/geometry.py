"""FLUX image geometry shared by config, resolution, image ops and the engine: `WxH` text, the
16-pixel patch, image tokens and resolution buckets. Pure Python, no dependencies."""

from __future__ import annotations

import re

# FLUX: the VAE downsamples by 8, then 2x2 latent patches are packed -> one token per 16x16 pixels.
PATCH = 16
_WXH = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")


def parse_wxh(text: str) -> tuple[int, int]:
    """`"1024x768"` -> (1024, 768). ASCII digits only; raises ValueError on anything else."""
    match = _WXH.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected WIDTHxHEIGHT such as '1024x1024', got {text!r}")
    return int(match[1]), int(match[2])


def format_wxh(width: int, height: int) -> str:
    return f"{width}x{height}"


def image_tokens(width: int, height: int) -> int:
    """Image tokens of a FLUX image: one per 16x16 pixel patch."""
    return (width // PATCH) * (height // PATCH)


def nearest_resolution(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (as FLUX Kontext picks them)."""
    aspect = width / height
    _, best_w, best_h = min((abs(aspect - w / h), w, h) for w, h in buckets)
    return best_w, best_h
