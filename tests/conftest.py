"""Fixtures shared by unit and integration tests."""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app.contract import ModelRequest

TESTS = Path(__file__).resolve().parent
# Every test under these directories starts Ray (tests/unit starts none: see its conftest).
RAY_DIRS = (TESTS / "integration", TESTS / "cluster")


def pytest_collection_modifyitems(items) -> None:
    """Mark `integration` every test that starts Ray, by its directory, so a new file there
    needs no `pytestmark` of its own: `-m "not integration"` is then exactly tests/unit."""
    for item in items:
        if any(item.path.is_relative_to(directory) for directory in RAY_DIRS):
            item.add_marker(pytest.mark.integration)


EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Exit with pytest's own status once every result is reported, without the interpreter's
    teardown. The process has then run Ray, gloo, torch.compile and spawned ranks; one full
    run (654 passed, results printed) died there with SIGSEGV (rc 139), after everything the
    tests check. Failures still fail: the status is pytest's, unchanged."""
    import os
    import sys

    status = config.stash.get(EXIT_STATUS, None)
    if status is None:  # the session never ran (e.g. --help): the normal exit
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory) -> str:
    """A fresh directory for the tiny model: each session builds and loads it from scratch."""
    from serve_app.tiny import ensure_tiny_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    ensure_tiny_model(path)
    return str(path)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_base64_image(b64).convert("RGB")).astype(np.int16)


def assert_batch_equivalent(batched: np.ndarray, alone: np.ndarray) -> None:
    """Batched matmuls round differently: allow +-2 per channel on under 0.1% of values."""
    assert batched.shape == alone.shape
    diff = np.abs(batched - alone)
    assert diff.max() <= 2, f"max channel difference {diff.max()}"
    assert (diff > 0).mean() < 0.001, f"{(diff > 0).mean():.4%} of values differ"


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes into a fully loaded PIL image (raises on corrupt data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_base64_image(b64: str) -> Image.Image:
    return decode_image(base64.b64decode(b64))


def make_job(**fields) -> ModelRequest:
    """A small text-to-image job; any field can be overridden."""
    values = dict(
        request_id="r", prompt="a cat", width=64, height=64, steps=2, guidance=2.5, seeds=(1,)
    )
    return ModelRequest(**{**values, **fields})


def api_error(fn, *args, **kwargs):
    """The APIError `fn(*args, **kwargs)` raises (fails the test if it raises none)."""
    from serve_app.contract import APIError

    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    return info.value


CORRUPT_SAFETENSORS = b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"


def write_test_adapters(path, tiny_cache_dir: str):
    """LoRA adapters for the tiny model in `path`: `a`, `b` (diffusers/PEFT format), `k`
    (kohya) and `corrupt` (not a safetensors file); returns the transformer they fit."""
    from diffusers import FluxTransformer2DModel

    from serve_app.lora_synthetic import write_adapter

    transformer = FluxTransformer2DModel.from_pretrained(tiny_cache_dir, subfolder="transformer")
    write_adapter(transformer, path / "a.safetensors", seed=1)
    write_adapter(transformer, path / "b.safetensors", seed=2)
    write_adapter(transformer, path / "k.safetensors", seed=3, fmt="kohya")
    (path / "corrupt.safetensors").write_bytes(CORRUPT_SAFETENSORS)
    return transformer


@pytest.fixture(scope="session")
def moderation_models(tmp_path_factory) -> dict[str, str]:
    """The tiny moderation classifiers (tests/moderation_models.py), saved once per session:
    paths of `image` and `text`, and the text classifier's `text_label` and `text_threshold`."""
    from tests.moderation_models import (
        save_image_classifier,
        save_text_classifier,
        text_threshold,
    )

    root = tmp_path_factory.mktemp("moderation")
    image = save_image_classifier(root / "image")
    text = save_text_classifier(root / "text")
    label, threshold = text_threshold(text)
    return {
        "image": str(image),
        "text": str(text),
        "text_label": label,
        "text_threshold": str(threshold),
    }
