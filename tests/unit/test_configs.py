"""Every serve config under configs/ passes Ray Serve's own schema and builds the app."""

from pathlib import Path

import pytest
import yaml
from ray.serve._private.build_app import build_app as ray_build_app
from ray.serve._private.config import ReplicaConfig
from ray.serve._private.utils import import_attr
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from serve_app.autoscaling import request_work
from serve_app.config import AppArgs, BatchingConfig
from serve_app.model import ImageModel
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


def assert_overrides_apply(deployment, override, path: str) -> None:
    """What Serve does at deploy time (`override_deployment_info`): the config's actor options
    and placement group replace the code's, then the replica config is validated again, e.g.
    that the replica's actor fits the first bundle of its placement group. Building the app
    alone never sees this, and a mismatch only fails when the config is deployed."""
    code = deployment._replica_config
    options = override.model_dump(exclude_unset=True)
    try:
        ReplicaConfig.create(
            deployment.name,
            ray_actor_options=options.get("ray_actor_options", code.ray_actor_options),
            placement_group_bundles=options.get(
                "placement_group_bundles", code.placement_group_bundles
            ),
            placement_group_strategy=options.get(
                "placement_group_strategy", code.placement_group_strategy
            ),
            max_replicas_per_node=options.get("max_replicas_per_node", code.max_replicas_per_node),
        )
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{path}: {override.name} would fail to deploy: {exc}") from exc


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    raw = yaml.safe_load(path.read_text())
    assert_known_keys(raw, path.name)
    schema = ServeDeploySchema.model_validate(raw)
    for app in schema.applications:
        args = AppArgs.model_validate(app.args)
        application = import_attr(app.import_path)(app.args)
        built = ray_build_app(application, name=app.name)
        deployments = {deployment.name: deployment for deployment in built.deployments}
        assert {m.deployment_name for m in args.models} <= set(deployments)
        for override in app.deployments:
            assert override.name in deployments, f"{path.name}: no deployment named {override.name}"
            assert_overrides_apply(deployments[override.name], override, path.name)
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
    # Resources from the model's args, not the deployment's: a GPU and num_cpus per replica.
    assert "ray_actor_options" not in deployment
    options = ImageModel.deployment_options(AppArgs.model_validate(app["args"]), model)
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
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


def test_moderation_is_on_in_production_and_off_locally_and_provenance_on_in_both():
    """The production model checks input and output images with BFL's reference classifier at
    its threshold; the local one moderates nothing unless turned on; both mark their images."""
    [production] = AppArgs.model_validate(
        yaml.safe_load((CONFIGS[0].parent / "flux-kontext.yaml").read_text())["applications"][0][
            "args"
        ]
    ).models
    safety = production.safety
    assert safety.checks_input_images and safety.checks_output_images
    assert safety.image_classifier is not None
    assert safety.image_classifier.source == "Falconsai/nsfw_image_detection"
    assert (safety.image_classifier.flagged_labels, safety.image_classifier.threshold) == (
        ["nsfw"],
        0.85,
    )
    local = AppArgs.model_validate(
        yaml.safe_load((CONFIGS[0].parent / "local.yaml").read_text())["applications"][0]["args"]
    ).models
    assert not any(model.safety.enabled for model in local)
    assert all(model.provenance.enabled for model in [production, *local])


def test_parallel_config_is_the_production_model_on_two_gpus_per_replica():
    """configs/flux-kontext-parallel.yaml: flux-kontext.yaml's model with `parallel` on, as 4
    replicas x 2 GPUs on one 8-GPU node; the placement group comes from the builder alone."""
    production = yaml.safe_load((CONFIGS[0].parent / "flux-kontext.yaml").read_text())
    config = yaml.safe_load((CONFIGS[0].parent / "flux-kontext-parallel.yaml").read_text())
    [base_app], [app] = production["applications"], config["applications"]
    assert {k: v for k, v in app.items() if k != "args" and k != "deployments"} == {
        k: v for k, v in base_app.items() if k != "args" and k != "deployments"
    }
    [base_model], [parallel_model] = base_app["args"]["models"], app["args"]["models"]
    parallel_model = dict(parallel_model)
    assert parallel_model.pop("parallel") == {"ulysses": 2, "ring": 1, "collective_timeout_s": 120}
    assert parallel_model == base_model  # the same model, only split across GPUs
    assert {k: v for k, v in app["args"].items() if k != "models"} == {
        k: v for k, v in base_app["args"].items() if k != "models"
    }

    args = AppArgs.model_validate(app["args"])
    [model] = args.models
    assert model.parallel.degree == 2 and model.warmup  # memory is measured, not planned
    deployment = next(d for d in app["deployments"] if d["name"] == model.deployment_name)
    assert not {"placement_group_bundles", "placement_group_strategy"} & set(deployment)
    options = ImageModel.deployment_options(args, model)
    assert options["placement_group_bundles"] == [{"CPU": 4, "GPU": 1}] * 2
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert "ray_actor_options" not in deployment  # the replica fits the first bundle
    # One 8-GPU node, every GPU a rank of a warm replica.
    assert "autoscaling_config" not in deployment
    assert deployment["num_replicas"] * model.parallel.degree == 8
    assert deployment["max_ongoing_requests"] >= deployment["user_config"]["max_batch_images"]


ONE_MACHINE_CPUS = 2  # the machine local*.yaml are written for (ours, CI's: 2 cores)


@pytest.mark.parametrize("name", ["local.yaml", "local-multi.yaml"])
def test_a_local_config_fits_one_small_machine_at_its_most_replicas(name):
    """Every replica a local config can scale to must be schedulable on one 2-core machine:
    Ray reserves each replica's CPUs, and one that does not fit waits forever (found by
    `serve run configs/local-multi.yaml`: five models at one CPU each left three unscheduled)."""
    raw = yaml.safe_load((CONFIGS[0].parent / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    total = 0.0
    for app in schema.applications:
        built = ray_build_app(import_attr(app.import_path)(app.args), name=app.name)
        overrides = {override.name: override for override in app.deployments}
        for deployment in built.deployments:
            override = overrides.get(deployment.name)
            options = override.model_dump(exclude_unset=True) if override else {}
            actor = options.get("ray_actor_options", deployment._replica_config.ray_actor_options)
            autoscaling = (
                options.get("autoscaling_config")
                or deployment._deployment_config.autoscaling_config
            )
            most = (
                (autoscaling["max_replicas"] if isinstance(autoscaling, dict)
                 else autoscaling.max_replicas)
                if autoscaling else options.get("num_replicas", deployment.num_replicas) or 1
            )  # fmt: skip
            total += most * actor.get("num_cpus", 1)
    assert total <= ONE_MACHINE_CPUS, f"{name}: {total} CPUs reserved at the most replicas"
