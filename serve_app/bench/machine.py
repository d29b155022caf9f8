"""What machine a benchmark ran on, recorded with every result; the jobs and the time budget
benchmarks share."""

from __future__ import annotations

import os
import platform
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    import torch

    info = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return info


def device_label(info: dict) -> str:
    return info["gpu"] or f"CPU: {info['cpu']} ({info['cores']} cores)"


def bench_job(
    config, size: str, steps: int, n: int = 1, prompt: str = "a lighthouse at dawn", canvas=None
):
    """The job a request for `size`, `steps` and `n` images becomes, through the same resolution
    as the server's (`canvas`: an edit's conditioning image)."""
    from serve_app.imageops import Conditioning
    from serve_app.protocol import ImageGenerationRequest
    from serve_app.resolution import resolve_generation

    request = ImageGenerationRequest(
        prompt=prompt, n=n, size=size, num_inference_steps=steps, seed=0
    )
    resolved = resolve_generation(request, {config.id: config}, max_n=max(n, 1))
    return resolved.to_model_request("bench", Conditioning(canvas) if canvas is not None else None)


class Budget:
    """The time left; a step that would not fit is skipped, not started."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()
