"""A queued job as bytes: the `ModelRequest` (images as PNG) and the `ResolvedGeneration` it came
from, as JSON. No pickle: Redis content never becomes code."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from typing import Any

from PIL import Image

from serve_app.contract import AdapterRef, ModelRequest
from serve_app.resolution import ResolvedGeneration

_IMAGE_FIELDS = ("init_image", "mask")
_RUNTIME_FIELDS = ("events", "cancel", "received_at")


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def _image(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def job_to_bytes(job: ModelRequest) -> bytes:
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(job):
        if field.name in _RUNTIME_FIELDS:
            continue
        value = getattr(job, field.name)
        if field.name == "conditioning":
            value = [_png(image) for image in value]
        elif field.name in _IMAGE_FIELDS:
            value = None if value is None else _png(value)
        elif field.name == "adapters":
            value = [dataclasses.asdict(adapter) for adapter in value]
        fields[field.name] = value
    return json.dumps(fields).encode()


def job_from_bytes(data: bytes) -> ModelRequest:
    fields = json.loads(data)
    fields["conditioning"] = tuple(_image(text) for text in fields["conditioning"])
    for name in _IMAGE_FIELDS:
        if fields[name] is not None:
            fields[name] = _image(fields[name])
    fields["adapters"] = tuple(AdapterRef(**adapter) for adapter in fields["adapters"])
    for name in ("seeds", "preview_steps"):
        fields[name] = tuple(fields[name])
    return ModelRequest(**fields)


def resolved_to_json(resolved: ResolvedGeneration) -> str:
    return json.dumps(dataclasses.asdict(resolved))


def resolved_from_json(text: str) -> ResolvedGeneration:
    fields = json.loads(text)
    fields["adapters"] = tuple(AdapterRef(**adapter) for adapter in fields["adapters"])
    return ResolvedGeneration(**fields)
