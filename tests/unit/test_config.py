"""The config schema: defaults, the tiny model's presets, and operator mistakes."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs, BatchingConfig, ModelConfig


def test_production_defaults_are_flux_kontext_dev():
    model = ModelConfig()
    assert model.source == "black-forest-labs/FLUX.1-Kontext-dev"
    assert model.default_size == "1024x1024" and model.max_sequence_length == 512
    assert model.quality_steps.high == 28 and model.default_quality == "high"


def test_tiny_source_brings_fast_presets_that_explicit_fields_override():
    tiny = ModelConfig(id="t", source="tiny")
    assert tiny.quality_steps.medium == 4 and tiny.default_quality == "medium"
    assert tiny.min_side == 64
    custom = ModelConfig(id="t", source="tiny", default_quality="high", min_side=128)
    assert custom.default_quality == "high" and custom.min_side == 128


def test_round_trip_through_dump_keeps_values():
    tiny = ModelConfig(id="t", source="tiny", quality_steps={"low": 1, "medium": 2, "high": 3})
    assert ModelConfig.model_validate(tiny.model_dump()) == tiny


def test_default_args_serve_the_tiny_model():
    args = AppArgs()
    assert [m.source for m in args.models] == ["tiny"]
    assert args.batching == BatchingConfig()


@pytest.mark.parametrize(
    "fields",
    [
        {"default_size": "1000x1000"},
        {"default_size": "big"},
        {"min_side": 1024, "max_side": 512},
        {"unknown_key": 1},
        {"dtype": "int8"},
    ],
)
def test_bad_model_config_is_rejected(fields):
    with pytest.raises(ValidationError):
        ModelConfig(**fields)


def test_model_ids_must_be_unique():
    with pytest.raises(ValidationError, match="unique"):
        AppArgs(models=[{"id": "a", "source": "tiny"}, {"id": "a", "source": "tiny"}])


def test_deployment_name_is_safe_for_ray():
    assert ModelConfig(id="black-forest-labs/FLUX.1 Kontext").deployment_name == (
        "ImageModel-black-forest-labs-FLUX.1-Kontext"
    )


def test_batching_bounds():
    with pytest.raises(ValidationError):
        BatchingConfig(max_batch_images=0)
    assert BatchingConfig.model_validate({"batch_wait_timeout_s": 0.5}).max_batch_images == 8


def test_readme_reference_tables_match_the_schema():
    from serve_app.docs import main

    assert main(["--check"]) == 0, "docs/ is stale: run python -m serve_app.docs"


def test_cache_layout(tmp_path, monkeypatch):
    """Every path under the cache directory comes from `serve_app.cache` (operators, the
    integration tests and old caches rely on them)."""
    from serve_app import cache

    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path))
    assert cache.cache_root() == tmp_path
    assert cache.redis_dir() == tmp_path / "redis"
    assert cache.redis_password_file() == tmp_path / "redis" / "password"
    assert cache.url_secret_file() == tmp_path / "url-secret"
    assert cache.images_dir() == tmp_path / "images"
    assert cache.job_images_dir() == tmp_path / "images" / "jobs"
    assert cache.images_dir("/srv/img") == cache.job_images_dir("/srv/img").parent
    assert str(cache.job_images_dir("/srv/img")) == "/srv/img/jobs"
    assert cache.lora_dir() == tmp_path / "lora"
    assert cache.lora_dir("ImageModel-x") == tmp_path / "lora" / "ImageModel-x"
    assert cache.tiny_model_dir("1") == tmp_path / "tiny-flux-kontext-v1"
    monkeypatch.delenv("SERVE_APP_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "serve_app"


def test_stored_secret_is_made_once_with_mode_0600(tmp_path):
    from serve_app.cache import stored_secret

    path = tmp_path / "dir" / "secret"
    first = stored_secret(path, 32)
    assert len(first) == 32 and stored_secret(path, 32) == first
    assert path.stat().st_mode & 0o777 == 0o600
