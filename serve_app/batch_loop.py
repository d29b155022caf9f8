"""The one batching mechanism of a model replica: an explicit queue drained by one task into
pipeline calls, one call at a time.

Why not `@serve.batch`: it closes a batch `batch_wait_timeout_s` after the batch's first request,
even while the previous call still runs, so under load it queues many small batches (measured:
3.3 images per call at concurrency 8 with 8 allowed). Here a request that arrives while a call
runs simply waits in the queue, and the next call takes every compatible waiting request up to
`max_images` (`batching.next_call`). A call that would not be full first waits up to `wait_s`
for company (measured: with that wait at every call, not only on an idle replica, calls at
concurrency 8 held 4.9-6.2 images instead of 4.9-5.0, and throughput rose 12.5 -> 14.3 images/s).

Cancellation: a caller that goes away cancels its own future; a queued request whose future is
cancelled is dropped before it runs. A request already in a call is the engine's business (its
`cancel` event, see `serve_app.model`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.batching import call_is_full, images_per_call, next_call
from serve_app.contract import ModelRequest

# Runs one pipeline call; returns one outcome per request, in order: a result or an exception.
RunCall = Callable[[list[ModelRequest]], Awaitable[list[Any]]]


class BatchLoop:
    def __init__(
        self, run_call: RunCall, max_images: int, wait_s: float, max_pixels: int | None = None
    ) -> None:
        self._run_call = run_call
        self.max_images = max_images
        self.wait_s = wait_s
        self.max_pixels = max_pixels  # per call, when memory caps it
        self._waiting: list[tuple[ModelRequest, asyncio.Future]] = []
        self.running: list[ModelRequest] = []  # the requests of the call in progress
        self._arrived = asyncio.Event()
        self._drainer: asyncio.Task | None = None

    def configure(self, max_images: int, wait_s: float, max_pixels: int | None = None) -> None:
        """New knobs apply from the next call on (`reconfigure` calls this)."""
        self.max_images, self.wait_s, self.max_pixels = max_images, wait_s, max_pixels

    def images_per_call(self, width: int, height: int) -> int:
        """The chunk size for a request of this size (`batching.images_per_call`)."""
        return images_per_call(width, height, self.max_images, self.max_pixels)

    @property
    def queued_jobs(self) -> int:
        return sum(not future.done() for _, future in self._waiting)

    def queued(self) -> list[ModelRequest]:
        """The requests waiting for a call whose callers are still there."""
        return [request for request, future in self._waiting if not future.done()]

    async def submit(self, request: ModelRequest) -> Any:
        """Queue one request (at most `max_images` images) and wait for its outcome."""
        if request.n > self.images_per_call(request.width, request.height):
            raise ValueError(
                f"a request of {request.n} images exceeds the "
                f"{self.images_per_call(request.width, request.height)} a call may hold"
            )
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._drainer is None or self._drainer.done():
            self._arrived = asyncio.Event()  # bound to the running loop
            self._drainer = asyncio.create_task(self._drain())
        self._arrived.set()
        return await future

    async def _drain(self) -> None:
        """Pipeline calls, one at a time, until nothing waits."""
        while self._take_live():
            await self._gather_company()
            if not self._take_live():
                break
            requests_and_futures = self._pop_next_call()
            requests = [request for request, _ in requests_and_futures]
            self.running = requests
            try:
                outcomes = await self._run_call(requests)
            except Exception as exc:  # noqa: BLE001 - the call's own requests get the failure
                outcomes = [exc] * len(requests)
            finally:
                self.running = []
            if len(outcomes) != len(requests):
                error = RuntimeError(
                    f"a pipeline call returned {len(outcomes)} outcomes for {len(requests)} "
                    "requests; every request needs exactly one"
                )
                outcomes = [error] * len(requests)
            for (_, future), outcome in zip(requests_and_futures, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _gather_company(self) -> None:
        """Before a call that would not be full, wait up to `wait_s` for more requests."""
        deadline = time.monotonic() + self.wait_s
        while self._take_live() and not call_is_full(
            self._requests(), self.max_images, self.max_pixels
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_live(self) -> bool:
        """Forget requests whose callers went away; whether any request still waits."""
        self._waiting = [
            (request, future) for request, future in self._waiting if not future.done()
        ]
        return bool(self._waiting)

    def _requests(self) -> list[ModelRequest]:
        return [request for request, _ in self._waiting]

    def _pop_next_call(self) -> list[tuple[ModelRequest, asyncio.Future]]:
        taken = next_call(self._requests(), self.max_images, self.max_pixels)
        chosen = [self._waiting[i] for i in taken]
        for index in reversed(taken):
            del self._waiting[index]
        return chosen
