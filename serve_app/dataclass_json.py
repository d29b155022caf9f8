"""Frozen dataclasses to JSON and back, driven by their fields and type hints (no pickle: what a
queue or Redis holds never becomes code).

A field's annotation says how its value round-trips: `str`/`int`/`float`/`bool`, `X | None`,
`tuple[X, ...]`, enums, nested dataclasses, and pydantic models. Two field metadata keys
change that: `{"json": "image"}` for PIL images (PNG, base64), alone or in a tuple, and
`{"json": "skip"}` for what never leaves a process (callbacks, events); a skipped field must have a
default. So a new field round-trips without new code, or fails loudly at its first use.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import io
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

SKIP = {"json": "skip"}
IMAGE = {"json": "image"}


def to_jsonable(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a dict of JSON values (skipped fields left out)."""
    return {
        field.name: encode_value(getattr(obj, field.name), field.metadata.get("json"))
        for field in dataclasses.fields(obj)
        if field.metadata.get("json") != "skip"
    }


def from_jsonable(cls: type[T], data: dict[str, Any]) -> T:
    """The dataclass `cls` from `to_jsonable`'s dict; unknown keys are an error (`TypeError`)."""
    hints = _hints(cls)  # type: ignore[arg-type]  # classes hash; mypy's TypeVar does not say
    known = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - {name for name, f in known.items() if f.metadata.get("json") != "skip"}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values = {
        name: decode_value(value, hints[name], known[name].metadata.get("json"))
        for name, value in data.items()
    }
    return cls(**values)


def encode_value(value: Any, kind: str | None) -> Any:
    if value is None:
        return None
    if kind == "image":
        return [_png(v) for v in value] if isinstance(value, tuple | list) else _png(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(value)
    if hasattr(value, "model_dump"):  # a pydantic model
        return value.model_dump(mode="json")
    if isinstance(value, tuple | list):
        return [encode_value(item, None) for item in value]
    return value


def decode_value(value: Any, hint: Any, kind: str | None = None) -> Any:
    """One JSON value back to the type `hint` names."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if len(options) != 1:
            raise TypeError(f"cannot decode into {hint}: one type besides None, please")
        return decode_value(value, options[0], kind)
    if kind == "image":
        return tuple(_image(v) for v in value) if origin is tuple else _image(value)
    if origin is tuple:
        return tuple(decode_value(item, args[0]) for item in value)
    if hint is Any:
        return value
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return hint(value)
        if dataclasses.is_dataclass(hint):
            return from_jsonable(hint, value)
        if hasattr(hint, "model_validate"):
            return hint.model_validate(value)
        if hint is float:
            return float(value)
        if hint is int:
            return int(value)
        if hint is bool:
            return bool(value)
        if hint is str:
            return str(value)
    raise TypeError(f"cannot decode into {hint!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_hint(cls: type, name: str) -> Any:
    return _hints(cls)[name]


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def _image(text: str) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image
