"""A model replica across several GPUs: rank 0 is the Serve replica, ranks 1..N-1 Ray actors.

`ParallelEngine` is a `ImageEngine` whose process joins a process group with N-1 `RankWorker`
actors started in the replica's own placement group (one bundle per rank; the builder derives
them from `parallel`, `ImageModel.deployment_options`). Every rank loads the same pipeline with
the same speed switches; each call, adapter load and removal is sent to every rank, and all
ranks run the same denoising loop in lockstep (`sequence_parallel`); rank 0 alone decodes,
sends previews and answers. Nothing above the engine changes: batching, streaming, LoRA sets,
memory caps and health checks are the single-GPU replica's.

Failure: a rank that dies, hangs past `parallel.collective_timeout_s`, or fails where its peers
did not leaves the process group unusable. The engine then kills its workers, answers the call
and every later one with a 503 (`ReplicaUnavailable`: retried by async jobs) and reports
unhealthy, so Ray Serve replaces the replica with a fresh placement group. Workers are owned by
the replica's actor, so they die with it too.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray
from PIL import Image
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from serve_app.config import ModelConfig
from serve_app.contract import GenerationCancelled, ModelRequest, ReplicaUnavailable
from serve_app.engine import ImageEngine, StepCallback
from serve_app.sequence_parallel import StepAgreement, join_group, leave_group, start_serving

logger = logging.getLogger("ray.serve")

PING_TIMEOUT_S = 10.0  # a worker that cannot answer a ping this fast is hung
# Workers of a Serve replica are named `<prefix><replica id>:<rank>` (operators and tests find
# them with `ray.util.list_named_actors`); they are not detached: the replica owns them.
WORKER_PREFIX = "SERVE_PARALLEL_RANK::"


def _replica_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve
        return None


def _free_address() -> str:
    """host:port for the process group's rendezvous on this node (rank 0 listens there)."""
    host = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"


def _rank_engine(config: ModelConfig, address: str, rank: int) -> ImageEngine:
    """Join the group, then build and load this rank's engine (diffusers' parallel setup in
    `load` is itself a collective: every rank loads at the same time)."""
    engine = ImageEngine(config)
    join_group(address, rank, config.parallel, engine.device)
    engine.lockstep = StepAgreement(engine.device)
    engine.load()
    start_serving(config.parallel)
    return engine


class RankWorker:
    """Rank 1..N-1 of a sequence-parallel replica: a ImageEngine that runs every call it is sent
    in lockstep with rank 0 and returns nothing (rank 0 decodes)."""

    def __init__(self, config: dict, address: str, rank: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.engine = _rank_engine(ModelConfig.model_validate(config), address, rank)

    def generate(self, requests: list[ModelRequest]) -> None:
        try:
            self.engine.generate(requests, decode=False)
        except GenerationCancelled:
            return None  # the ranks agreed to stop; rank 0 reports it

    def add_adapter(self, name: str, state: dict) -> None:
        self.engine.add_adapter(name, state)

    def remove_adapters(self, names: list[str]) -> None:
        self.engine.remove_adapters(names)

    def agree(self, count: int) -> None:
        for _ in range(count):
            self.engine.lockstep(False)  # type: ignore[misc]

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()


RemoteRankWorker: Any = ray.remote(RankWorker)


class ParallelEngine(ImageEngine):
    """Rank 0 of a sequence-parallel replica (see the module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.workers: list[Any] = []
        self.broken: str | None = None  # why the process group is unusable, once it is
        self.agreement: StepAgreement | None = None

    def load(self) -> None:
        """Start the workers in this replica's placement group, join the group, load on every
        rank at once."""
        import torch

        degree = self.config.parallel.degree
        address = _free_address()
        group = ray.util.get_current_placement_group()
        bundles = group.bundle_specs if group is not None else []
        if group is not None and len(bundles) < degree:
            raise RuntimeError(
                f"model {self.config.id!r}: parallel degree {degree} needs {degree} placement "
                f"group bundles, the replica has {len(bundles)}"
            )
        config = self.config.model_dump()
        for rank in range(1, degree):
            self.workers.append(self._start_worker(config, address, rank, bundles, group))
        started = [worker.ping.remote() for worker in self.workers]
        join_group(address, 0, self.config.parallel, self.device)
        self.agreement = StepAgreement(self.device)
        self.lockstep = self.agreement
        try:
            super().load()
            start_serving(self.config.parallel)
            ray.get(started, timeout=self.config.parallel.collective_timeout_s)
        except BaseException:
            self.close()
            raise
        logger.info(
            "model %s: %d sequence-parallel ranks (ulysses %d, ring %d), %d torch threads each",
            self.config.id, degree, self.config.parallel.ulysses, self.config.parallel.ring,
            torch.get_num_threads(),
        )  # fmt: skip

    def _start_worker(self, config: dict, address: str, rank: int, bundles, group) -> Any:
        import torch

        # Outside Serve (scripts, the benchmark): a GPU of its own on CUDA, no CPU reserved.
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1 if self.device == "cuda" else 0}
        if group is not None:  # exactly its bundle's resources
            bundle = bundles[rank]
            options = {
                "num_cpus": bundle.get("CPU", 0),
                "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank
                ),
            }
        replica = _replica_name()
        if replica:
            options["name"] = f"{WORKER_PREFIX}{replica}:{rank}"
        threads = self.config.torch_threads or torch.get_num_threads()
        # Two threads: a ping is answered while a call runs.
        actor = RemoteRankWorker.options(max_concurrency=2, **options)
        return actor.remote(config, address, rank, threads)

    @property
    def loaded(self) -> bool:
        return self.pipe is not None and self.broken is None

    def check_health(self) -> None:
        """Raises when the group is unusable or a worker does not answer a ping."""
        if self.broken:
            raise RuntimeError(f"model {self.config.id!r}: {self.broken}")
        try:
            ray.get([worker.ping.remote() for worker in self.workers], timeout=PING_TIMEOUT_S)
        except Exception as exc:
            self._break(f"a parallel rank does not answer: {type(exc).__name__}: {exc}")
            raise RuntimeError(f"model {self.config.id!r}: {self.broken}") from exc

    def generate(
        self,
        requests: Sequence[ModelRequest],
        step_callback: StepCallback | None = None,
        decode: bool = True,
    ) -> list[list[Image.Image]]:
        """The call on every rank at once: the peers get the requests without rank 0's
        callbacks (events, cancel flag), and follow its stop decisions step by step."""
        self._require_group()
        portable = [replace(r, events=None, cancel=None) for r in requests]
        calls = [worker.generate.remote(portable) for worker in self.workers]
        try:
            images = super().generate(requests, step_callback, decode)
        except GenerationCancelled:
            self._collect(calls, None)
            raise
        except Exception as exc:
            self._collect(calls, exc)
            raise
        self._collect(calls, None)
        return images

    def add_adapter(self, name: str, state: dict) -> None:
        self._require_group()
        super().add_adapter(name, state)  # a bad file fails here, before any peer sees it
        shared = ray.put(state)
        self._everywhere([worker.add_adapter.remote(name, shared) for worker in self.workers])

    def remove_adapters(self, names: Sequence[str]) -> None:
        self._require_group()
        super().remove_adapters(names)
        self._everywhere([worker.remove_adapters.remote(list(names)) for worker in self.workers])

    def broadcast_seconds(self, count: int = 20) -> float:
        """Mean time of one step agreement with nothing else running (the benchmark)."""
        assert self.agreement is not None
        peers = [worker.agree.remote(count) for worker in self.workers]
        started = time.perf_counter()
        for _ in range(count):
            self.agreement(False)
        seconds = (time.perf_counter() - started) / count
        ray.get(peers)
        return seconds

    def close(self) -> None:
        """Kill the workers and leave the group (the replica is going away)."""
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        leave_group()

    # --- failure handling

    def _require_group(self) -> None:
        if self.broken:
            raise ReplicaUnavailable(
                f"This model replica lost one of its parallel ranks ({self.broken}) and is "
                "being replaced. Retry shortly."
            )

    def _collect(self, calls: list[Any], own_error: BaseException | None) -> None:
        """Wait for the peers' side of a call. The group stays usable only if every peer
        finished in time, and either all succeeded (or agreed to stop) or failed just like
        rank 0 (a deterministic error before any collective); anything else breaks it."""
        timeout = self.config.parallel.collective_timeout_s
        deadline = time.monotonic() + timeout
        for call in calls:
            try:
                ray.get(call, timeout=max(0.0, deadline - time.monotonic()))
            except RayTaskError as exc:
                cause = exc.cause
                same = (
                    own_error is not None
                    and type(cause) is type(own_error)
                    and str(cause) == str(own_error)
                )
                if not same:
                    self._break(f"a parallel rank failed: {type(cause).__name__}: {cause}")
            except Exception as exc:  # noqa: BLE001 - died, or hung past the timeout
                self._break(f"a parallel rank was lost: {type(exc).__name__}: {exc}")
        if self.broken:
            raise ReplicaUnavailable(
                f"This model replica lost one of its parallel ranks ({self.broken}) and is "
                "being replaced. Retry shortly."
            ) from own_error

    def _everywhere(self, calls: list[Any]) -> None:
        """An adapter change on the peers: one that fails there but not on rank 0 leaves the
        ranks with different weights, so the replica must go."""
        try:
            ray.get(calls, timeout=self.config.parallel.collective_timeout_s)
        except Exception as exc:  # noqa: BLE001
            self._break(f"a parallel rank could not follow an adapter change: {exc}")
            self._require_group()

    def _break(self, reason: str) -> None:
        if self.broken:
            return
        self.broken = reason
        logger.error("model %s: %s; the replica will be replaced", self.config.id, reason)
        for worker in self.workers:
            ray.kill(worker)  # none is left waiting in a collective or holding a GPU
