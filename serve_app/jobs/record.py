"""One asynchronous job as it lives in Redis: the only code that knows the hash's field names.

A job is one Redis hash whose field names are `JobRecord`'s attribute names. `to_hash`/`from_hash`
(and `hash_fields` for a partial update) encode and decode every value from the field's type
(`serve_app.dataclass_json`): text as is, anything else as JSON. The Lua scripts in
`serve_app.jobs.store` are templates over the same names (`lua`): a renamed field or status there
fails at import, not in production. A new job field: add it here, with a default (old records
lack it); nothing else needs to know its spelling.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from string import Template
from typing import Any

from serve_app.dataclass_json import decode_value, encode_value, field_hint
from serve_app.protocol import Usage
from serve_app.resolution import ResolvedGeneration

NOT_STORED = {"stored": False}


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(frozen=True)
class JobError:
    """A failed job's error, as the job object's `error` shows it."""

    message: str
    type: str
    code: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class JobRecord:
    """A job: who asked for what (set at submission), and how it went (set by the consumer)."""

    id: str
    status: JobStatus
    model: str
    endpoint: str  # "generations", "edits" or "variations"
    owner: str  # the API key's name ("-" without keys)
    created_at: float
    request_id: str = ""
    resolved: ResolvedGeneration | None = None  # what the job's result is shaped from
    input_tokens: int = 0  # the input image's tokens (edits, variations)
    base_url: str = ""  # where the job's links point (webhook bodies are made without a request)
    ttl_s: int = 0  # how long a finished job and its images are kept
    webhook_url: str | None = None
    # Set by the store's scripts:
    seq: int | None = None  # submission order
    attempts: int = 0
    progress: float = 0.0
    started_at: float | None = None
    heartbeat: float | None = None
    worker: str | None = None
    last_error: str | None = None  # why the last attempt was put back (logs, not clients)
    cancel: bool = False
    completed_at: float | None = None
    # The result (completed) or the error (failed):
    images: tuple[str, ...] = ()  # names in the job image store
    usage: Usage | None = None
    created: int | None = None  # the result's `created`
    batch_sizes: tuple[int, ...] = ()
    error: JobError | None = None
    # Not in the hash: the store computes it when it reads a queued job.
    queue_position: int | None = field(default=None, metadata=NOT_STORED)

    def to_hash(self) -> dict[str, str]:
        """Every stored field that is set, as Redis hash text."""
        values = {f.name: getattr(self, f.name) for f in _STORED}
        return JobRecord.hash_fields(**values)

    @staticmethod
    def hash_fields(**values: Any) -> dict[str, str]:
        """Some fields, by attribute name, as Redis hash text (None: left out)."""
        unknown = set(values) - set(FIELD)
        if unknown:
            raise TypeError(f"JobRecord has no field(s) {sorted(unknown)}")
        return {name: _text(value) for name, value in values.items() if value is not None}

    @classmethod
    def from_hash(cls, fields: dict[str, str], queue_position: int | None = None) -> JobRecord:
        """A record from its hash; fields this version does not know are ignored (a newer
        writer), missing ones take their defaults (an older writer)."""
        values: dict[str, Any] = {}
        for name, text in fields.items():
            if name in FIELD:
                values[name] = _value(name, text)
        return cls(**values, queue_position=queue_position)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


_STORED = [f for f in dataclasses.fields(JobRecord) if f.metadata.get("stored", True)]
FIELD = {f.name: f.name for f in _STORED}  # the hash's field names, for the Lua templates


def lua(script: str) -> str:
    """A Lua script with `$field` for hash field names and `$STATUS` for status values."""
    names = {**FIELD, **{status.name: status.value for status in JobStatus}}
    return Template(script).substitute(names)


def _text(value: Any) -> str:
    if isinstance(value, str):  # text, and JobStatus (a str enum)
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, ResolvedGeneration):
        return value.to_json()
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(encode_value(value, None))


def _value(name: str, text: str) -> Any:
    hint = field_hint(JobRecord, name)
    if hint is str or hint == (str | None):
        return text
    if hint is ResolvedGeneration or name == "resolved":
        return ResolvedGeneration.from_json(text)
    if hint is JobStatus:
        return JobStatus(text)
    if hint is int or hint == (int | None):
        return int(float(text))  # Lua's HINCRBY and older writers' "1.0" alike
    return decode_value(json.loads(text), hint)
