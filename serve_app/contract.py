"""What crosses between deployments: the model request an HTTP request becomes, the events and
result a model replica sends back, and the errors either side raises.

The ingress builds a `ModelRequest` (see `ResolvedGeneration.to_model_request`), the model
deployment runs it and answers with a `GenerationResult`, or, when streaming, with `Accepted`,
`PartialImage`s and `Completed`. Everything here pickles across Ray process boundaries intact,
and a `ModelRequest` also serialises itself to JSON for an asynchronous job's queue. No HTTP, no
wire models, no torch: a new field goes on `ModelRequest`, a new event next to the others here.
"Job" always means an asynchronous job (`serve_app.jobs`), never this unit of model work.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.dataclass_json import IMAGE, SKIP, from_jsonable, to_jsonable

# --- errors ----------------------------------------------------------------------------------


def _default_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class APIError(Exception):
    """A failure the client should see: message, the parameter at fault, a machine-readable code,
    the HTTP status to answer with and headers (`Retry-After`, `WWW-Authenticate`).

    Raised anywhere (ingress, a model replica, storage); the ingress turns it into OpenAI's error
    envelope. It survives pickling across Ray process boundaries with every field.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        # A 400 about one parameter is an invalid value unless a more specific code is given.
        self.code = code or ("invalid_value" if param and status == 400 else None)
        self.type = type or _default_error_type(status)
        self.headers = dict(headers or {})

    def __reduce__(self):
        fields = {
            "status": self.status,
            "param": self.param,
            "code": self.code,
            "type": self.type,
            "headers": self.headers,
        }
        return (_rebuild_api_error, (self.message, fields))


def _rebuild_api_error(message: str, fields: dict[str, Any]) -> APIError:
    return APIError(message, **fields)


class ReplicaUnavailable(APIError):
    """The model replica can no longer serve (a sequence-parallel rank was lost) and is being
    replaced: 503 with Retry-After; an asynchronous job retries it like a replica loss."""

    def __init__(self, message: str, **fields: Any) -> None:
        fields = {"status": 503, "code": "model_unavailable", "headers": {"Retry-After": "5"}}
        super().__init__(message, **fields)

    def __reduce__(self):
        return (ReplicaUnavailable, (self.message,))


class GenerationCancelled(RuntimeError):
    """Every request of a pipeline call went away; the call stopped at a step boundary."""


# --- the model request ----------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA adapter a model request runs with: its registry name and its weight."""

    name: str
    scale: float = 1.0


def adapter_set_id(adapters: tuple[AdapterRef, ...]) -> str:
    """The adapter set as Ray Serve's multiplexed model id: names only (a replica that holds
    the set serves any scales), sorted, joined by `+` (never in a name); "" for none."""
    return "+".join(sorted(adapter.name for adapter in adapters))


@dataclass(frozen=True)
class ModelRequest:
    """One request's work for the model: a prompt, a geometry and one seed per image.

    ``conditioning`` holds the input image canvas that Kontext conditions on (edits, variations),
    already at its final size; masked edits add ``init_image`` (the image to inpaint, at the output
    size) and ``mask`` (L mode, 255 = editable). ``preview_steps`` are the denoising steps after
    which a streaming request wants previews. ``first_image_index`` is the position of this chunk's
    first image in its request (a request split into chunks keeps its image numbering).
    ``adapters`` are the LoRA adapters to apply, sorted by name (only requests with equal adapters
    and scales share a call).

    The last three fields are set inside the model replica and never cross a process boundary:
    ``events`` receives the request's `PreviewImages` from the engine's step callback, ``cancel`` is
    set when the request goes away (so the engine can stop a call that only cancelled requests
    still wait for), ``received_at`` is when the replica got the request (monotonic).
    """

    request_id: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    output_format: str = "png"
    output_compression: int = 100
    conditioning: tuple[Any, ...] = field(default=(), metadata=IMAGE)
    init_image: Any = field(default=None, metadata=IMAGE)
    mask: Any = field(default=None, metadata=IMAGE)
    preview_steps: tuple[int, ...] = ()
    first_image_index: int = 0
    adapters: tuple[AdapterRef, ...] = ()  # sorted by name; empty = the base weights
    # A digest of the input images, for families whose pipeline takes one reference set per
    # call (only requests with equal digests share one); "" for the others.
    references_key: str = ""
    report_progress: bool = False  # streaming: send `Progress` after every denoising step
    # Moderation: the request's `moderation` (`auto` | `low`), and its input images downscaled
    # for their check (`moderation.thumbnails`; only when the model checks input images).
    moderation: str = "auto"
    moderation_inputs: tuple[Any, ...] = field(default=(), metadata=IMAGE)
    events: Callable[[PreviewImages | Progress], None] | None = field(
        default=None, compare=False, repr=False, metadata=SKIP
    )
    cancel: threading.Event | None = field(default=None, compare=False, repr=False, metadata=SKIP)
    received_at: float = field(default=0.0, compare=False, metadata=SKIP)

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def masked(self) -> bool:
        return self.mask is not None

    @property
    def low_moderation(self) -> bool:
        return self.moderation == "low"

    @property
    def adapter_set(self) -> str:
        return adapter_set_id(self.adapters)

    def to_json(self) -> bytes:
        """For an asynchronous job's queue: every field but the replica's own (images as PNG)."""
        return json.dumps(to_jsonable(self)).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ModelRequest:
        return from_jsonable(cls, json.loads(data))


@dataclass(frozen=True)
class PreviewImages:
    """Inside a replica, engine -> model: previews of a request's images after step `step`."""

    partial_index: int
    step: int
    first_image_index: int
    images: list[Any]


# --- what a model replica answers --------------------------------------------------------------


@dataclass(frozen=True)
class GenerationResult:
    """Encoded images in seed order, plus what the response's `usage` needs."""

    images: list[bytes]
    text_tokens: int
    batch_sizes: list[int]  # images in each pipeline call this request's chunks ran in
    served_by: str = ""  # the replica that ran it (Ray Serve replica id)


@dataclass(frozen=True)
class Accepted:
    """Stream event 1: the request passed the replica's checks; its text token count."""

    text_tokens: int


@dataclass(frozen=True)
class PartialImage:
    """Stream event: one encoded preview of image `image_index` (0-based within the request)."""

    image_index: int
    partial_image_index: int
    image: bytes


@dataclass(frozen=True)
class Progress:
    """Stream event (requests that ask for it): `step` of `total` denoising steps are done."""

    step: int
    total: int

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


@dataclass(frozen=True)
class Completed:
    """Last stream event: the whole result, as `generate` would have returned it."""

    result: GenerationResult


StreamEvent = Accepted | PartialImage | Progress | Completed
