"""Cluster manifests: validated with Ray's own schemas, one source of truth for the serve config."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.cluster import MANIFESTS
from serve_app.cluster import main as cluster_main
from serve_app.config import AppArgs
from serve_app.model import ImageModel

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = yaml.safe_load((ROOT / "configs" / "flux-kontext.yaml").read_text())
RAYSERVICE = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
LAUNCHER = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
PARALLEL_CONFIG = yaml.safe_load((ROOT / "configs" / "flux-kontext-parallel.yaml").read_text())
PARALLEL = yaml.safe_load((ROOT / "cluster" / "rayservice-parallel.yaml").read_text())


def model_deployment(config: dict = SERVE_CONFIG) -> dict:
    [app] = config["applications"]
    [model] = AppArgs.model_validate(app["args"]).models
    return next(d for d in app["deployments"] if d["name"] == model.deployment_name)


def test_every_manifest_is_generated():
    assert {path.relative_to(ROOT).as_posix(): config.relative_to(ROOT).as_posix()
            for path, config in MANIFESTS.items()} == {
        "cluster/rayservice.yaml": "configs/flux-kontext.yaml",
        "cluster/rayservice-parallel.yaml": "configs/flux-kontext-parallel.yaml",
    }  # fmt: skip
    assert cluster_main(["--check"]) == 0, "run python -m serve_app.cluster"


@pytest.mark.parametrize(
    "manifest, config", [(RAYSERVICE, SERVE_CONFIG), (PARALLEL, PARALLEL_CONFIG)],
    ids=["rayservice", "rayservice-parallel"],
)  # fmt: skip
def test_rayservice_embeds_the_serve_config_verbatim(manifest, config):
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert embedded == config
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


def test_parallel_rayservice_is_one_8_gpu_pod_per_4_replicas_of_2_gpus():
    """cluster/rayservice-parallel.yaml: the worker pods are whole 8-GPU nodes, as many as the
    deployment's replicas x ranks fill, and otherwise what cluster/rayservice.yaml runs."""
    assert PARALLEL["apiVersion"] == "ray.io/v1" and PARALLEL["kind"] == "RayService"
    assert PARALLEL["metadata"]["name"] != RAYSERVICE["metadata"]["name"]  # both can coexist
    cluster = PARALLEL["spec"]["rayClusterConfig"]
    base = RAYSERVICE["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"] == base["headGroupSpec"]
    [workers], [base_workers] = cluster["workerGroupSpecs"], base["workerGroupSpecs"]
    [container], [base_container] = (
        w["template"]["spec"]["containers"] for w in (workers, base_workers)
    )
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus_per_pod == 8
    assert container["resources"]["requests"] == container["resources"]["limits"]
    [app] = PARALLEL_CONFIG["applications"]
    [model] = AppArgs.model_validate(app["args"]).models
    deployment = model_deployment(PARALLEL_CONFIG)
    ranks = deployment["num_replicas"] * model.parallel.degree
    assert ranks % gpus_per_pod == 0  # whole nodes, no GPU left idle
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"]
    assert workers["maxReplicas"] == ranks // gpus_per_pod
    # Every rank's bundle (the builder's) fits the pod, all replicas together too.
    bundles = ImageModel.deployment_options(AppArgs.model_validate(app["args"]), model)[
        "placement_group_bundles"
    ]
    assert sum(b["GPU"] for b in bundles) * deployment["num_replicas"] == gpus_per_pod
    assert sum(b["CPU"] for b in bundles) * deployment["num_replicas"] <= int(
        container["resources"]["limits"]["cpu"]
    )
    assert container["env"] == base_container["env"]
    assert container["volumeMounts"] == base_container["volumeMounts"]
    assert (
        workers["template"]["spec"]["tolerations"]
        == base_workers["template"]["spec"]["tolerations"]
    )


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
