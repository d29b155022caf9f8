"""The request time limit stops the model's work, not only the answer (the fake ingress)."""

import asyncio

from tests.unit.conftest import FakeStream


class SilentStream(FakeStream):
    """A model stream whose first event never comes (a long queue, a huge request)."""

    def __init__(self) -> None:
        super().__init__([])

    async def __anext__(self):
        await asyncio.sleep(3600)


def test_a_stream_that_times_out_before_its_first_event_is_cancelled(app, fake, monkeypatch):
    streams = []

    def stream(job):
        streams.append(SilentStream())
        return streams[-1]

    monkeypatch.setattr(fake, "stream", stream)
    body = {"prompt": "a cat", "size": "64x64", "stream": True}
    answer = app.post("/v1/images/generations", json=body)  # request_timeout_s: 2
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "timeout"
    assert [s.cancelled for s in streams] == [True]
