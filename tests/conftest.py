"""Fixtures shared by unit and integration tests."""

import numpy as np
import pytest

from serve_app.codec import decode_base64_image


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
