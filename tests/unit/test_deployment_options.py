"""Each deployment class declares its own `serve.deployment` options; `build_app` validates the
args first, with errors that name the field, and binds the classes with them. No Ray started."""

import pytest
from pydantic import ValidationError
from ray.serve._private.build_app import build_app as ray_build_app

from serve_app.app import build_app
from serve_app.config import AppArgs, JobsConfig, ModelConfig
from serve_app.ingress import ImagesIngress
from serve_app.jobs.consumer import ImageJobConsumer
from serve_app.jobs.redis_server import EmbeddedRedis
from serve_app.model import ImageModel


def test_model_options_size_the_queue_to_two_batches_and_ask_for_a_gpu_on_cuda():
    args = AppArgs.model_validate({"batching": {"max_batch_images": 4}, "access_log": False})
    options = ImageModel.deployment_options(args, ModelConfig(id="m/x", device="cuda"))
    assert options == {
        "name": "ImageModel-m-x",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1},
        "max_ongoing_requests": 8,
        "user_config": {"max_batch_images": 4},  # only what was set
        "health_check_timeout_s": 120,
        "logging_config": {"enable_access_log": False},
    }
    default = ImageModel.deployment_options(AppArgs(), ModelConfig(source="tiny"))
    assert default["ray_actor_options"] == {"num_cpus": 1} and default["user_config"] == {}
    assert default["max_ongoing_requests"] == 16


def test_ingress_redis_and_consumer_options():
    args = AppArgs(access_log=False)
    assert ImagesIngress.deployment_options(args) == {
        "name": "ImagesIngress",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 256,
        "logging_config": {"enable_access_log": False},
    }
    assert EmbeddedRedis.deployment_options(args) == {
        "name": "EmbeddedRedis",
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0},
        "health_check_period_s": 2,
        "logging_config": {"enable_access_log": False},
    }
    consumer = ImageJobConsumer.deployment_options(args)
    assert consumer["name"] == "ImageJobConsumer"
    assert consumer["ray_actor_options"] == {"num_cpus": 0}
    assert consumer["graceful_shutdown_timeout_s"] > args.jobs.drain_s
    policy = consumer["autoscaling_config"]["policy"]
    assert JobsConfig.model_validate(policy["policy_kwargs"]["jobs"]) == args.jobs


def test_build_app_binds_every_deployment_with_its_declared_options(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path))
    monkeypatch.delenv("SERVE_APP_REDIS_URL", raising=False)
    args = AppArgs(access_log=False)
    built = ray_build_app(build_app(args.model_dump()), name="images")
    deployments = {deployment.name: deployment for deployment in built.deployments}
    model = args.models[0]
    assert set(deployments) == {
        "ImagesIngress", "ImageJobConsumer", "EmbeddedRedis", model.deployment_name,
    }  # fmt: skip
    declared = {
        "ImagesIngress": ImagesIngress.deployment_options(args),
        "EmbeddedRedis": EmbeddedRedis.deployment_options(args),
        model.deployment_name: ImageModel.deployment_options(args, model),
    }
    for name, options in declared.items():
        deployment = deployments[name]
        assert deployment.ray_actor_options == options["ray_actor_options"], name
        assert not deployment.logging_config["enable_access_log"], name
    assert deployments["ImagesIngress"].max_ongoing_requests == 256
    assert deployments[model.deployment_name].max_ongoing_requests == 16
    consumer = deployments["ImageJobConsumer"]._deployment_config
    assert consumer.graceful_shutdown_timeout_s == 300
    # The policy reads the embedded server's password file, never a password.
    jobs = consumer.autoscaling_config.policy.policy_kwargs["jobs"]
    assert jobs["embedded"] is True
    assert jobs["redis_password_file"] == str(tmp_path / "redis" / "password")
    assert (tmp_path / "redis" / "password").stat().st_mode & 0o777 == 0o600


def test_build_app_without_jobs_binds_no_consumer():
    built = ray_build_app(build_app({"jobs": {"enabled": False}}), name="images")
    assert {deployment.name for deployment in built.deployments} == {
        "ImagesIngress", "ImageModel-flux-kontext-tiny",
    }  # fmt: skip


def test_default_timings_are_valid():
    jobs = JobsConfig()
    assert (jobs.heartbeat_s, jobs.stale_s, jobs.drain_s, jobs.graceful_shutdown_s) == (
        1.0, 6.0, 240, 300,
    )  # fmt: skip
    # The edges are allowed.
    JobsConfig(heartbeat_s=2, stale_s=6, visibility_timeout_s=10)
    JobsConfig(drain_s=290, graceful_shutdown_s=300)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"heartbeat_s": 3}, r"jobs\.stale_s \(6 s\) must be at least 3 x jobs\.heartbeat_s"),
        ({"stale_s": 2.5}, r"jobs\.stale_s \(2\.5 s\) must be at least 3 x jobs\.heartbeat_s"),
        ({"drain_s": 295}, r"jobs\.drain_s \(295 s\) must be at least 10 s less than "
                           r"jobs\.graceful_shutdown_s \(300 s\)"),
        ({"graceful_shutdown_s": 240}, r"jobs\.drain_s \(240 s\) must be at least 10 s less"),
        ({"visibility_timeout_s": 10, "stale_s": 9},
         r"jobs\.visibility_timeout_s \(10 s\) must be at least jobs\.stale_s \+ 2 x "
         r"jobs\.heartbeat_s \(11 s\)"),
    ],
)  # fmt: skip
def test_bad_timings_are_refused_saying_which_fields_and_why(fields, message):
    with pytest.raises(ValidationError, match=message):
        JobsConfig(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"heartbeat_s": 0}, {"stale_s": -1}, {"drain_s": -1}, {"graceful_shutdown_s": 0},
     {"heartbeat_s": "soon"}, {"visibility_timeout_s": 5}],
)  # fmt: skip
def test_out_of_range_timings_name_the_field(fields):
    [name] = fields
    with pytest.raises(ValidationError) as caught:
        AppArgs.model_validate({"jobs": fields})
    assert [error["loc"] for error in caught.value.errors()] == [("jobs", name)]


def test_build_app_refuses_bad_args_naming_the_field():
    with pytest.raises(ValidationError) as caught:
        build_app({"jobs": {"drain_s": 295}})
    [error] = caught.value.errors()
    assert error["loc"] == ("jobs",) and "jobs.drain_s" in error["msg"]
    with pytest.raises(ValidationError) as caught:
        build_app({"jobs": {"heartbeat": 1}})  # misspelt
    assert [error["loc"] for error in caught.value.errors()] == [("jobs", "heartbeat")]
    with pytest.raises(ValidationError) as caught:
        build_app({"models": [{"id": "m", "source": "tiny", "min_side": "big"}]})
    assert [error["loc"] for error in caught.value.errors()] == [("models", 0, "min_side")]
