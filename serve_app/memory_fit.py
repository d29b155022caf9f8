"""How many images a pipeline call may hold on this device: fitted from two measured calls.

At warm-up a GPU replica measures the peak memory of a call of one image and of two images at
its largest warm-up size. Peak memory is close to linear in the pixels of a call (activations
scale with tokens; weights and workspace are the constant part), so two points give the constant
and the cost per pixel, and with the device's capacity the largest call that fits. Pure
arithmetic; the measuring is the engine's (`ImageEngine.measure_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

HEADROOM = 0.9  # use at most this share of the device's memory (allocator fragmentation)


@dataclass(frozen=True)
class MemoryFit:
    """Peak bytes of a call of `pixels` pixels: `base_bytes + bytes_per_pixel * pixels`."""

    base_bytes: int
    bytes_per_pixel: float
    capacity_bytes: int
    headroom: float = HEADROOM

    @property
    def max_call_pixels(self) -> int:
        """The most pixels (sum over a call's images) a call may hold."""
        free = self.capacity_bytes * self.headroom - self.base_bytes
        if free <= 0 or self.bytes_per_pixel <= 0:
            return 0
        return int(free // self.bytes_per_pixel)

    def max_images(self, width: int, height: int) -> int:
        """The most images of `width` x `height` one call may hold (0: not even one fits)."""
        return self.max_call_pixels // (width * height)

    def describe(self, width: int, height: int) -> str:
        mib = 2**20
        per_image = self.bytes_per_pixel * width * height / mib
        return (
            f"peak = {self.base_bytes / mib:.0f} MiB + {per_image:.0f} MiB per {width}x{height} "
            f"image; capacity {self.capacity_bytes / mib:.0f} MiB x "
            f"{self.headroom}: at most {self.max_images(width, height)} such images per call"
        )


def fit_memory(
    peak_one: int, peak_two: int, pixels_per_image: int, capacity_bytes: int
) -> MemoryFit:
    """The line through (one image, `peak_one`) and (two images, `peak_two`)."""
    per_image = max(peak_two - peak_one, 1)
    return MemoryFit(
        base_bytes=max(peak_one - per_image, 0),
        bytes_per_pixel=per_image / pixels_per_image,
        capacity_bytes=capacity_bytes,
    )


def one_image_per_call(width: int, height: int, capacity_bytes: int) -> MemoryFit:
    """A fit that allows exactly one `width` x `height` image per call (and no more pixels)."""
    return MemoryFit(
        base_bytes=0,
        bytes_per_pixel=capacity_bytes * HEADROOM / (1.5 * width * height),
        capacity_bytes=capacity_bytes,
    )


def batch_limit(
    fit: MemoryFit | None, requested: int | None, default: int, width: int, height: int
) -> int:
    """`max_batch_images` to use: the request if it fits (else a clear error), otherwise the
    default capped by what fits. Without a fit (CPU), the request or the default."""
    if fit is None:
        return requested or default
    fits = fit.max_images(width, height)
    if fits < 1:
        raise ValueError(f"not even one image fits in memory: {fit.describe(width, height)}")
    if requested is not None:
        if requested > fits:
            raise ValueError(
                f"max_batch_images {requested} cannot fit in memory: {fit.describe(width, height)}"
            )
        return requested
    return min(default, fits)
