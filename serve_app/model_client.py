"""How anything outside a model deployment calls it: one client for the ingress and the consumer.

`ModelClient` is the protocol both sides program against (unit tests pass fakes); `RayModelClient`
is it over a Ray Serve deployment handle. It owns the three rules every caller must follow:
- **routing**: a request with LoRA adapters goes through model multiplexing (`multiplexed_model_id`
  = its adapter set), so a replica that holds the set gets it;
- **handles**: each `.options(...)` variant is made once and cached (as Ray Serve LLM's router
  does), not rebuilt per request;
- **backpressure**: a full model deployment (`BackPressureError`) is the caller's answer at once
  (`wait_s=None`: the ingress turns it into a 503), or is waited out in steps of `wait_s` seconds
  (the job consumer: a job waits its turn, which is not a retry).

The async entries (`generate`, `stream`) run on the ingress's event loop; `stream_sync` runs on a
plain thread (the consumer's Celery worker thread), iterating Ray's response generator there.
No Starlette, no HTTP: `serve_app.jobs` uses this module as freely as `serve_app.http` does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from serve_app.contract import GenerationCancelled, GenerationResult, ModelRequest, StreamEvent

logger = logging.getLogger("ray.serve")

TOKEN_CHECK_TIMEOUT_S = 10  # a replica too busy to count tokens this soon lets the job in


class ModelStream(Protocol):
    """A model's events for one request (async); `cancel` stops the model's work."""

    def __anext__(self) -> Any: ...

    def cancel(self) -> None: ...


class SyncModelStream(Protocol):
    """A model's events for one request, iterated on a plain thread; `cancel` from any thread."""

    def __iter__(self) -> Iterator[StreamEvent]: ...

    def cancel(self) -> None: ...


class ModelClient(Protocol):
    """How callers reach one model deployment."""

    async def generate(self, request: ModelRequest) -> GenerationResult: ...

    def stream(self, request: ModelRequest) -> ModelStream: ...

    def stream_sync(self, request: ModelRequest) -> SyncModelStream: ...

    async def check_request(self, request: ModelRequest) -> int: ...


class RayModelClient:
    """A model deployment's handle as a `ModelClient` (see the module docstring for its rules)."""

    def __init__(self, handle: Any, wait_s: float | None = None) -> None:
        self.handle = handle
        self.wait_s = wait_s
        self._handles: dict[tuple[bool, str], Any] = {}
        self._lock = threading.Lock()  # the consumer's Celery threads share one client

    def handle_for(self, request: ModelRequest | None, stream: bool = False) -> Any:
        """The cached handle variant for this request: streaming or not, and routed by its
        adapter set (Serve model multiplexing) when it has adapters."""
        adapter_set = request.adapter_set if request is not None and request.adapters else ""
        key = (stream, adapter_set)
        with self._lock:
            handle = self._handles.get(key)
            if handle is None:
                options: dict[str, Any] = {}
                if stream:
                    options["stream"] = True
                if adapter_set:
                    options["multiplexed_model_id"] = adapter_set
                handle = self.handle.options(**options) if options else self.handle
                self._handles[key] = handle
        return handle

    async def generate(self, request: ModelRequest) -> GenerationResult:
        return await cancel_when_abandoned(self.handle_for(request).generate.remote(request))

    def stream(self, request: ModelRequest) -> ModelStream:
        return self.handle_for(request, stream=True).generate_stream.remote(request)

    def stream_sync(self, request: ModelRequest) -> SyncModelStream:
        return _WaitingStream(lambda: self.stream(request), self.wait_s)

    async def check_request(self, request: ModelRequest) -> int:
        """The model's checks (prompt length; with parallel ranks, the sequence split) before a
        job is accepted. A replica too busy to answer soon lets the job in unchecked (the job
        then fails with the same 400)."""
        from ray.serve.exceptions import BackPressureError

        try:
            response = self.handle_for(None).check_request.remote(request)
            return await asyncio.wait_for(cancel_when_abandoned(response), TOKEN_CHECK_TIMEOUT_S)
        except (asyncio.TimeoutError, BackPressureError) as exc:
            logger.warning("prompt not checked before queueing: %s", type(exc).__name__)
            return 0


class _WaitingStream:
    """A synchronous stream that, with `wait_s` set, opens the model's stream again after a
    `BackPressureError` (the deployment was full before the request got in) until it is
    accepted or cancelled. `cancel` stops the open stream from any thread."""

    def __init__(self, open_stream: Any, wait_s: float | None) -> None:
        self._open = open_stream
        self._wait_s = wait_s
        self._current: Any = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled.set()
            if self._current is not None:
                self._current.cancel()

    def __iter__(self) -> Iterator[StreamEvent]:
        from ray.serve.exceptions import BackPressureError

        while not self._cancelled.is_set():
            with self._lock:
                self._current = stream = self._open()
                if self._cancelled.is_set():  # cancelled before the stream existed
                    stream.cancel()
            started = False
            try:
                for event in stream:
                    started = True
                    yield event
                return
            except BackPressureError:
                if started or self._wait_s is None:
                    raise
                self._cancelled.wait(self._wait_s)  # full: wait our turn (not a retry)
        raise GenerationCancelled("the model request was cancelled before the model took it")


async def cancel_when_abandoned(response: Any) -> Any:
    """Await a `DeploymentResponse`; if the awaiting task is cancelled (the request's time limit,
    a client that left), cancel the request in the model replica too. Cancelling the await alone
    leaves the replica working on an answer nobody will read."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
