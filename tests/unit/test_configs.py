"""Every serve config under configs/ passes Ray Serve's own schema and builds the app."""

from pathlib import Path

import pytest
import yaml
from ray.serve._private.build_app import build_app as ray_build_app
from ray.serve._private.utils import import_attr
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from serve_app.autoscaling import request_work
from serve_app.config import AppArgs, BatchingConfig
from tests.conftest import make_job

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def assert_known_keys(raw: dict, path: str) -> None:
    """Ray's deployment schema ignores unknown keys; a misspelt option must not pass silently."""
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), f"{path}: {set(app)}"
        for deployment in app.get("deployments", []):
            unknown = set(deployment) - set(DeploymentSchema.model_fields)
            assert not unknown, f"{path}: unknown deployment options {unknown}"
            unknown = set(deployment.get("autoscaling_config", {})) - set(
                AutoscalingConfig.model_fields
            )
            assert not unknown, f"{path}: unknown autoscaling options {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    raw = yaml.safe_load(path.read_text())
    assert_known_keys(raw, path.name)
    schema = ServeDeploySchema.model_validate(raw)
    for app in schema.applications:
        args = AppArgs.model_validate(app.args)
        application = import_attr(app.import_path)(app.args)
        built = ray_build_app(application, name=app.name)
        names = {deployment.name for deployment in built.deployments}
        assert {m.deployment_name for m in args.models} <= names
        for override in app.deployments:
            assert override.name in names, f"{path.name}: no deployment named {override.name}"
            if isinstance(override.user_config, dict):
                batching = BatchingConfig.model_validate(override.user_config)
                # Ray warns when a replica can never fill a batch.
                assert override.max_ongoing_requests >= batching.max_batch_images


def test_local_config_serves_tiny_with_autoscaling():
    config = yaml.safe_load((CONFIGS[0].parent / "local.yaml").read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    [app] = config["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    model = next(d for d in app["deployments"] if d["name"].startswith("ImageModel-"))
    assert model["autoscaling_config"]["min_replicas"] == 1
    assert model["autoscaling_config"]["max_replicas"] == 2


def test_production_config_runs_flux_kontext_on_gpus():
    config = yaml.safe_load((CONFIGS[0].parent / "flux-kontext.yaml").read_text())
    [app] = config["applications"]
    [model] = AppArgs.model_validate(app["args"]).models
    assert model.source == "black-forest-labs/FLUX.1-Kontext-dev" and model.dtype == "bfloat16"
    deployment = next(d for d in app["deployments"] if d["name"] == model.deployment_name)
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    batch = deployment["user_config"]["max_batch_images"]
    # Scaled on work: the target is a full batch of the default size at the default steps.
    policy = deployment["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "serve_app.autoscaling:WorkPolicy"
    full_batch = request_work(
        make_job(width=1024, height=1024, steps=model.quality_steps.high, seeds=tuple(range(batch)))
    )
    assert policy["policy_kwargs"]["target_work_per_replica"] == full_batch
    assert deployment["max_ongoing_requests"] >= batch
    assert deployment["max_queued_requests"] > 0
    assert deployment["autoscaling_config"]["downscale_delay_s"] >= 300
