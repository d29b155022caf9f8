"""Cluster manifests: validated with Ray's own schemas, one source of truth for the serve config."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cluster import main as cluster_main
from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = yaml.safe_load((ROOT / "configs" / "flux-kontext.yaml").read_text())
RAYSERVICE = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
LAUNCHER = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())


def model_deployment() -> dict:
    [app] = SERVE_CONFIG["applications"]
    [model] = AppArgs.model_validate(app["args"]).models
    return next(d for d in app["deployments"] if d["name"] == model.deployment_name)


def test_rayservice_embeds_the_serve_config_verbatim():
    assert cluster_main(["--check"]) == 0, "run python -m serve_app.cluster"
    embedded = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    assert embedded == SERVE_CONFIG
    ServeDeploySchema.model_validate(embedded)


def test_rayservice_cluster_shape():
    cluster = RAYSERVICE["spec"]["rayClusterConfig"]
    assert RAYSERVICE["apiVersion"] == "ray.io/v1" and RAYSERVICE["kind"] == "RayService"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [workers] = cluster["workerGroupSpecs"]
    [container] = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    autoscaling = model_deployment()["autoscaling_config"]
    assert workers["minReplicas"] == autoscaling["min_replicas"]
    assert workers["maxReplicas"] == autoscaling["max_replicas"]
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert "persistentVolumeClaim" in volumes["model-cache"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HOME"]["value"].startswith(mounts["model-cache"])
    assert "valueFrom" in env["HF_TOKEN"]  # from a Secret, never inline


def test_launcher_config_validates_against_rays_autoscaler_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(LAUNCHER, json.loads(schema_path.read_text()))
    gpu = LAUNCHER["available_node_types"]["gpu_worker"]
    autoscaling = model_deployment()["autoscaling_config"]
    assert gpu["resources"]["GPU"] == 1
    assert gpu["min_workers"] == autoscaling["min_replicas"]
    assert gpu["max_workers"] == LAUNCHER["max_workers"] == autoscaling["max_replicas"]
    assert LAUNCHER["available_node_types"]["head"]["resources"]["GPU"] == 0


def test_launcher_schema_catches_mistakes():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    broken = {**LAUNCHER, "max_workers": "eight"}
    try:
        jsonschema.validate(broken, json.loads(schema_path.read_text()))
    except jsonschema.ValidationError:
        return
    raise AssertionError("the schema accepted max_workers: 'eight'")


def test_a_cuda_model_asks_ray_for_a_gpu_per_replica():
    """`device: cuda` (bench report --device cuda, gpu-check --serve) needs a GPU from Ray, or
    the replica would see none; other devices ask for none."""
    from serve_app.app import model_deployment_options
    from serve_app.config import ModelConfig

    args = AppArgs()
    cuda = model_deployment_options(args, ModelConfig(source="synthetic", device="cuda"))
    assert cuda["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    auto = model_deployment_options(args, ModelConfig(source="tiny"))
    assert auto["ray_actor_options"] == {"num_cpus": 1}
