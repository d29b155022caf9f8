"""Speed switches applied to a loaded FLUX transformer (`ModelConfig.speed`); see docs/gpu.md.

Each failure raises `SpeedOptionError` saying why the option cannot be used here; the engine
turns it into a `ModelLoadError` that fails the replica's start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_app.config import SpeedConfig


class SpeedOptionError(RuntimeError):
    """A configured speed option that cannot work on this machine."""


def apply_speed_options(
    transformer, speed: SpeedConfig, enable_parallel: Callable[[Any], None] | None = None
) -> None:
    """Attention backend, sequence parallelism (`enable_parallel`: it checks that the backend
    supports it, and the later switches then see its hooks), fp8 quantization, first-block
    cache, regional compile, in that order."""
    if speed.attention_backend:
        try:
            transformer.set_attention_backend(speed.attention_backend)
        except Exception as exc:
            raise SpeedOptionError(
                f"attention backend {speed.attention_backend!r} is not usable here: {exc}"
            ) from exc
    if enable_parallel is not None:
        enable_parallel(transformer)
    if speed.quantization == "fp8":
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
        except ImportError as exc:
            raise SpeedOptionError(
                "speed.quantization 'fp8' needs torchao: pip install torchao"
            ) from exc
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig())
    if speed.first_block_cache_threshold is not None:
        from diffusers import FirstBlockCacheConfig

        transformer.enable_cache(FirstBlockCacheConfig(threshold=speed.first_block_cache_threshold))
    if speed.compile:
        cache_enabled = speed.first_block_cache_threshold is not None
        compile_transformer(transformer, cache_enabled)


def compile_transformer(transformer, cache_enabled: bool) -> None:
    """Regional compile of the repeated blocks. The first-block cache's hook decides per step
    whether to run the remaining blocks and is `torch.compiler.disable()`d, which a full graph
    cannot inline (`Unsupported: Skip inlining ...` at the first call), so with the cache on
    each block compiles with graph breaks allowed around the hook."""
    transformer.compile_repeated_blocks(fullgraph=not cache_enabled)
