"""A model replica's LoRA adapters: which are loaded, loading them, unloading the least recently
used, all through Ray Serve model multiplexing.

The multiplexed "model" is an adapter set (`contract.adapter_set_id`: names only, since scales
change per call for free). Ray Serve keeps the `lora.max_loaded` most recently used sets per
replica and routes a request to a replica that already holds its set. Loading a set reads each
missing file on a worker thread (beside a running pipeline call), then injects it on the pipeline
thread between calls; evicting a set unloads the adapters no other loaded set or waiting
request uses.
Outside a Serve replica (unit tests) sets are loaded the same way and never evicted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from serve_app.adapters import AdapterRegistry
from serve_app.cache import lora_dir
from serve_app.config import ModelConfig
from serve_app.contract import AdapterRef, APIError, ModelRequest

logger = logging.getLogger("ray.serve")


class LoadedSet:
    """What Serve's multiplexer caches for one adapter set. Serve calls `__del__` when it
    evicts the set (and the garbage collector may call it again): the release runs once."""

    def __init__(self, set_id: str, release: Callable[[str], None]) -> None:
        self.set_id = set_id
        self._release: Callable[[str], None] | None = release
        self._lock = threading.Lock()

    def __del__(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release(self.set_id)


def _in_serve_replica() -> bool:
    try:
        from ray.serve.context import _get_internal_replica_context

        return _get_internal_replica_context() is not None
    except Exception:  # noqa: BLE001 - no Ray at all
        return False


class ReplicaAdapters:
    """Adapters on one replica. `busy` lists the adapter names of requests waiting or running, which
    are never unloaded under them."""

    def __init__(
        self,
        config: ModelConfig,
        engine: Any,
        pipeline_thread: Executor,
        metrics: Any,
        busy: Callable[[], set[str]],
    ) -> None:
        self.config = config
        self.registry = AdapterRegistry(config.id, config.lora, _download_dir(config))
        self.engine = engine
        self.pipeline_thread = pipeline_thread
        self.metrics = metrics
        self.busy = busy
        self.loaded_sets: dict[str, LoadedSet] = {}
        self._prepared: dict[str, dict] = {}  # read, checked, not yet injected
        self._pins: collections.Counter[str] = collections.Counter()  # requests in flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_lock = asyncio.Lock()
        self._get_set = self._multiplexed_loader()

    def _multiplexed_loader(self) -> Callable[[str], Any]:
        async def load_adapter_set(set_id: str) -> LoadedSet:
            return await self._load_set(set_id)

        if not _in_serve_replica():
            return load_adapter_set
        from ray import serve

        # A plain function (not a bound method): Serve keeps its LRU on the function object.
        return serve.multiplexed(max_num_models_per_replica=self.config.lora.max_loaded)(
            load_adapter_set
        )

    async def acquire(self, request: ModelRequest) -> None:
        """Make sure the request's adapter set is loaded here (a cache hit is a dict lookup)."""
        if not request.adapters:
            return
        self._loop = asyncio.get_running_loop()
        for adapter in request.adapters:
            self.metrics.adapter_requests.inc(tags={"adapter": adapter.name})
        # Read new files first: a missing or bad file fails here, before Serve's multiplexer
        # evicts a loaded set to make room for it.
        missing = [a.name for a in request.adapters if a.name not in self.engine.adapters]
        try:
            for name in missing:
                if name not in self._prepared:
                    self._prepared[name] = await self._read(name)
            await self._get_set(request.adapter_set)
        finally:
            for name in missing:
                self._prepared.pop(name, None)

    @contextlib.contextmanager
    def pinned(self, request: ModelRequest):
        """While a request is between `acquire` and its batch (and in it), its adapters are
        never unloaded: an eviction meanwhile keeps them."""
        names = [adapter.name for adapter in request.adapters]
        self._pins.update(names)
        try:
            yield
        finally:
            self._pins.subtract(names)
            self._pins += collections.Counter()  # drop zero counts

    async def ensure_loaded(self, adapters: tuple[AdapterRef, ...]) -> None:
        """Before a call: reload any of its adapters unloaded while it waited (rare: its set
        was evicted and reloaded by others meanwhile)."""
        for adapter in adapters:
            if adapter.name not in self.engine.adapters:
                await self._load(adapter.name)

    def loaded(self) -> list[str]:
        return sorted(self.engine.adapters)

    async def _load_set(self, set_id: str) -> LoadedSet:
        for name in set_id.split("+"):
            if name not in self.engine.adapters:
                await self._load(name)
        loaded = LoadedSet(set_id, self._release_threadsafe)
        self.loaded_sets[set_id] = loaded
        return loaded

    async def _load(self, name: str) -> None:
        """Read on a worker thread, inject on the pipeline thread (after the running call)."""
        from serve_app.engine_adapters import AdapterLoadError

        async with self._load_lock:
            if name in self.engine.adapters:
                return
            started = time.perf_counter()
            state = self._prepared.pop(name, None) or await self._read(name)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(
                    self.pipeline_thread, self.engine.add_adapter, name, state
                )
            except AdapterLoadError as exc:
                raise _invalid(exc) from None
            seconds = time.perf_counter() - started
            self.metrics.adapter_loads.inc(tags={"adapter": name})
            self.metrics.adapter_load_seconds.observe(seconds)
            logger.info("loaded adapter %s in %.3fs", name, seconds)

    async def _read(self, name: str) -> dict:
        """The adapter's file (downloaded if remote) read and checked, on worker threads."""
        from serve_app.engine_adapters import AdapterLoadError

        path = await asyncio.to_thread(self.registry.fetch, name)
        try:
            return await asyncio.to_thread(self.engine.read_adapter, name, str(path))
        except AdapterLoadError as exc:
            raise _invalid(exc) from None

    def _release_threadsafe(self, set_id: str) -> None:
        """Called by `LoadedSet.__del__` from any thread: unload on the replica's loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: loop.create_task(self._release(set_id)))

    async def _release(self, set_id: str) -> None:
        self.loaded_sets.pop(set_id, None)
        async with self._load_lock:
            needed = {name for other in self.loaded_sets for name in other.split("+")}
            needed |= self.busy() | set(self._pins)
            unused = [name for name in set_id.split("+") if name not in needed]
            if not unused:
                return
            await asyncio.get_running_loop().run_in_executor(
                self.pipeline_thread, self.engine.remove_adapters, unused
            )
        for name in unused:
            self.metrics.adapter_evictions.inc(tags={"adapter": name})
        logger.info("evicted adapter set %s: unloaded %s", set_id, unused)


def _invalid(exc: Exception) -> APIError:
    """A refused adapter: 400 when it is for another model family (the request named the wrong
    adapter), 422 when the file itself is unreadable, damaged or of other dimensions."""
    from serve_app.engine_adapters import AdapterFamilyError

    logger.warning("adapter refused: %s", exc)
    if isinstance(exc, AdapterFamilyError):
        return APIError(str(exc), status=400, param="lora", code="adapter_wrong_family")
    return APIError(str(exc), status=422, param="lora", code="adapter_invalid")


def _download_dir(config: ModelConfig) -> str:
    return str(lora_dir(config.deployment_name))
