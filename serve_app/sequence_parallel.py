"""Sequence parallelism inside one replica, the torch side (no Ray, no HTTP).

Every rank of a replica holds the whole pipeline and runs the same call with the same inputs;
diffusers' context parallelism (`transformer.enable_parallelism`, the Flux `_cp_plan`) splits
the transformer's image and text tokens across the ranks and gathers its output, so each rank
computes 1/N of every attention and MLP. What this module adds around it:

- the process group (`join_group`: NCCL on CUDA, gloo on CPU) with a bounded collective timeout;
- `StepAgreement`: the stop-or-continue decision after each denoising step, taken by rank 0 and
  broadcast, so a cancelled call stops on every rank at the same step and no rank waits in a
  collective its peers have left;
- `split_problem`: whether a request's sequence splits on this backend. NCCL gathers unequal
  shards (diffusers' `ulysses_anything` / `ring_anything`), gloo cannot, so on CPU a token count
  not divisible by the degree is refused (400 naming `size`) rather than left to hang or fail.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from serve_app.config import ParallelConfig
from serve_app.contract import ModelRequest
from serve_app.geometry import PATCH


def backend_for(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


# Joining and loading: ranks read ~31 GiB each, at their own pace, before the first collective
# (diffusers' mesh setup); only afterwards does `collective_timeout_s` apply (`start_serving`).
LOAD_TIMEOUT_S = 1800.0


def join_group(address: str, rank: int, parallel: ParallelConfig, device: str) -> None:
    """Join the replica's process group (blocks until every rank has joined)."""
    if device == "cuda":
        torch.cuda.set_device(0)  # Ray shows each rank its own GPU as device 0
        # A timed-out NCCL collective raises in the caller (who answers 503 and reports
        # unhealthy) instead of tearing the process down (torch's default).
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    dist.init_process_group(
        backend_for(device),
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=parallel.degree,
        timeout=timedelta(seconds=max(LOAD_TIMEOUT_S, parallel.collective_timeout_s)),
    )


def start_serving(parallel: ParallelConfig) -> None:
    """Loaded: from now on a collective waits at most `collective_timeout_s`."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(timedelta(seconds=parallel.collective_timeout_s))


def leave_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a broken group may not shut down cleanly
            dist.destroy_process_group()


def uneven_splits(parallel: ParallelConfig, backend: str) -> bool:
    """Whether shards of unequal length work: NCCL's all-gather takes them (diffusers'
    "anything" modes, one kind of parallelism at a time); gloo's does not."""
    return backend == "nccl" and (parallel.ulysses == 1 or parallel.ring == 1)


@contextlib.contextmanager
def _one_device_on_cpu(device: str) -> Iterator[None]:
    """diffusers picks the rank's device as `rank % torch.accelerator.device_count()`, which
    divides by zero on a machine without an accelerator; on CPU there is one device."""
    if device != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_sequence_parallel(transformer: Any, parallel: ParallelConfig, device: str) -> None:
    """Split the transformer's sequence across the process group (every rank calls this)."""
    from diffusers import ContextParallelConfig

    if not dist.is_initialized() or dist.get_world_size() != parallel.degree:
        raise ValueError(f"parallel degree {parallel.degree} needs a process group of that size")
    uneven = uneven_splits(parallel, backend_for(device))
    heads = transformer.config.num_attention_heads
    if heads % parallel.ulysses and not (uneven and parallel.ring == 1):
        raise ValueError(
            f"parallel.ulysses {parallel.ulysses} must divide the transformer's {heads} "
            "attention heads"
        )
    config = ContextParallelConfig(
        ulysses_degree=parallel.ulysses,
        ring_degree=parallel.ring,
        ulysses_anything=uneven and parallel.ring == 1,
        ring_anything=uneven and parallel.ulysses == 1 and parallel.ring > 1,
    )
    with _one_device_on_cpu(device):
        transformer.enable_parallelism(config=config)


def agree_on_cache_skips(transformer: Any) -> int:
    """diffusers' first-block cache decides after the first block whether to skip the rest,
    from the change in that block's residual; under context parallelism each rank sees only
    its shard, so ranks could decide differently and one would wait in a collective the other
    skipped. Each cache's decision is replaced by one on the whole sequence: the ratio of sums
    |now - before| / |before| (numerators and denominators over the same elements, so the
    single-GPU mean ratio exactly), summed over the ranks in one all-reduce. Returns how many
    caches were changed."""
    import types

    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    changed = 0
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) if registry is not None else None
        if hook is not None:
            hook._should_compute_remaining_blocks = types.MethodType(_decide_on_all_ranks, hook)
            changed += 1
    return changed


@torch.compiler.disable
def _decide_on_all_ranks(hook: Any, residual: torch.Tensor) -> bool:
    previous = hook.state_manager.get_state().head_block_residual
    if previous is None:  # the call's first step, on every rank
        return True
    sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).float()
    dist.all_reduce(sums)
    return bool((sums[0] / sums[1]).item() > hook.threshold)


def sequence_tokens(request: ModelRequest, input_in_sequence: bool = True) -> int:
    """Image tokens the transformer sees: the output's 16x16 patches, plus the conditioning
    canvas's for edits of families that append it to the sequence (Kontext, FLUX.2's
    references; `input_in_sequence`), not of those that re-noise it (image-to-image)."""
    tokens = (request.width // PATCH) * (request.height // PATCH)
    if request.conditioning and input_in_sequence:
        width, height = request.conditioning[0].size
        tokens += (width // PATCH) * (height // PATCH)
    return tokens


def split_problem(
    request: ModelRequest, parallel: ParallelConfig, device: str, input_in_sequence: bool = True
) -> str | None:
    """Why this request's sequence cannot be split across the ranks here, or None."""
    if parallel.degree == 1 or uneven_splits(parallel, backend_for(device)):
        return None
    tokens = sequence_tokens(request, input_in_sequence)
    if tokens % parallel.degree == 0:
        return None
    return (
        f"size {request.width}x{request.height} gives {tokens} image tokens"
        + (" (with the input image's)" if request.conditioning and input_in_sequence else "")
        + f", which do not split evenly across this model's {parallel.degree} parallel ranks "
        f"on {backend_for(device)}; choose a size whose width/16 x height/16 is a multiple of "
        f"{parallel.degree}"
    )


class StepAgreement:
    """After each denoising step every rank calls this with its own wish to stop; rank 0's
    decides (it alone knows whether the requests are still wanted) and reaches every rank in
    one broadcast of one integer. Also times those broadcasts (the per-step overhead)."""

    def __init__(self, device: str) -> None:
        self._flag = torch.zeros(1, dtype=torch.int32, device="cuda" if device == "cuda" else "cpu")
        self.seconds = 0.0
        self.count = 0

    def __call__(self, stop: bool) -> bool:
        started = time.perf_counter()
        self._flag.fill_(int(stop))
        dist.broadcast(self._flag, src=0)
        decided = bool(self._flag.item())
        self.seconds += time.perf_counter() - started
        self.count += 1
        return decided
