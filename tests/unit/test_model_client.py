"""The one model client: cached handle variants, adapter routing, one backpressure rule."""

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError

from serve_app.contract import AdapterRef, GenerationCancelled
from serve_app.model_client import RayModelClient
from tests.conftest import make_job


def full() -> BackPressureError:
    return BackPressureError(num_queued_requests=4, max_queued_requests=4)


class Stream:
    def __init__(self, events) -> None:
        self.events, self.cancelled = events, False

    def __iter__(self):
        for event in self.events:
            if isinstance(event, BaseException):
                raise event
            yield event

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    """A deployment handle that records every `.options(...)` it makes and what it was sent."""

    def __init__(self, streams=None, options=None, log=None) -> None:
        self.made = log if log is not None else []
        self.options_given = options or {}
        self.streams = streams if streams is not None else []
        self.sent = []
        self.generate_stream = self

    def options(self, **options):
        self.made.append(options)
        return Handle(self.streams, {**self.options_given, **options}, self.made)

    def remote(self, request):
        self.sent.append((self.options_given, request))
        return self.streams.pop(0)


def test_handle_variants_are_made_once_per_stream_and_adapter_set():
    handle = Handle(streams=[Stream(["done"]) for _ in range(6)])
    client = RayModelClient(handle)
    plain = make_job()
    styled = make_job(adapters=(AdapterRef("a", 0.5), AdapterRef("b")))
    rescaled = make_job(adapters=(AdapterRef("a", 1.0), AdapterRef("b")))
    for request in (plain, styled, rescaled, plain, styled, rescaled):
        assert list(client.stream_sync(request)) == ["done"]
    assert handle.made == [{"stream": True}, {"stream": True, "multiplexed_model_id": "a+b"}]
    assert client.handle_for(plain) is handle  # the plain handle, no options


def test_a_full_deployment_is_waited_out_when_the_caller_waits():
    handle = Handle(streams=[Stream([full()]), Stream([full()]),
                             Stream(["accepted", "done"])])  # fmt: skip
    client = RayModelClient(handle, wait_s=0.01)
    assert list(client.stream_sync(make_job())) == ["accepted", "done"]


def test_a_full_deployment_is_the_callers_answer_when_it_does_not_wait():
    handle = Handle(streams=[Stream([full()])])
    with pytest.raises(BackPressureError):
        list(RayModelClient(handle).stream_sync(make_job()))


def test_backpressure_after_the_first_event_is_not_waited_out():
    handle = Handle(streams=[Stream(["accepted", full()]), Stream(["never"])])
    with pytest.raises(BackPressureError):
        list(RayModelClient(handle, wait_s=0.01).stream_sync(make_job()))


def test_cancelling_while_waiting_for_room_stops_at_once():
    handle = Handle(streams=[Stream([full()]) for _ in range(1000)])
    stream = RayModelClient(handle, wait_s=30).stream_sync(make_job())

    async def cancel_soon():
        await asyncio.sleep(0.1)
        stream.cancel()

    async def run():
        task = asyncio.create_task(cancel_soon())
        with pytest.raises(GenerationCancelled):
            await asyncio.to_thread(list, stream)
        await task

    asyncio.run(asyncio.wait_for(run(), 5))


def test_a_stream_cancelled_before_it_opens_cancels_the_models_request():
    opened = Stream(["accepted"])
    stream = RayModelClient(Handle(streams=[opened])).stream_sync(make_job())
    stream.cancel()
    with pytest.raises(GenerationCancelled):
        list(stream)
    assert opened.events == ["accepted"]  # never opened: the model was not asked
