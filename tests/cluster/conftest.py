"""A real multi-node Ray cluster on one machine (ray.cluster_utils.Cluster, as Ray's own
multi-node tests do): a head node for the proxy and the ingress, two worker nodes carrying the
`model_node` resource that stands for a GPU, the app deployed from configs/cluster-tiny.yaml the
way `serve deploy` does. One CPU per node, the tiny model at 64x64.

These run before tests/integration (pytest's order), whose in-process Ray instance they must not
share: the cluster is started and torn down within this directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import URL_SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]
APP = "images"
MODEL = "ImageModel-flux-kontext-tiny"
INGRESS = "ImagesIngress"
# `worker_node` lets a test move the ingress off the head (url images read through another node).
WORKER = {"num_cpus": 1, "resources": {"model_node": 1, "worker_node": 1}}


def cluster_config(port: int, cache_dir: str, images_dir: str) -> dict:
    config = yaml.safe_load((ROOT / "configs" / "cluster-tiny.yaml").read_text())
    config["http_options"]["port"] = port
    [app] = config["applications"]
    app["args"]["models"][0]["cache_dir"] = cache_dir
    app["args"]["storage"] = {"local_dir": images_dir}
    app["runtime_env"] = {"env_vars": {"SERVE_APP_URL_SECRET": URL_SECRET}}
    return config


def replicas(deployment: str) -> list[dict]:
    """Serve's own view of a deployment's replicas (state, node_id), from the controller."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    app = details["applications"].get(APP)
    if app is None or deployment not in app["deployments"]:
        return []
    return app["deployments"][deployment]["replicas"]


def deployment_config(config: dict, name: str) -> dict:
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def running_nodes(deployment: str) -> list[str]:
    return sorted(r["node_id"] for r in replicas(deployment) if r["state"] == "RUNNING")


def wait_for(predicate, timeout_s: float = 180, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.5)


def app_running() -> bool:
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is not None and status.status == "DEPLOY_FAILED":
        pytest.fail(f"app failed to deploy: {status.message}")
    return status is not None and status.status == "RUNNING"


class ServeCluster:
    def __init__(self, cluster, client, config: dict) -> None:
        self.cluster = cluster
        self.client = client
        self.config = config
        self.url = f"http://127.0.0.1:{config['http_options']['port']}"
        self.workers = []

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id

    def add_worker(self):
        node = self.cluster.add_node(**WORKER)
        self.cluster.wait_for_nodes()
        self.workers.append(node)
        return node

    def remove_worker(self, node, graceful: bool = False) -> None:
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.workers.remove(node)

    def deploy(self, config: dict | None = None) -> None:
        """What `serve deploy` does: the declarative path (user_config changes apply in place)."""
        from ray import serve
        from ray.serve.schema import ServeDeploySchema

        def deployed_at() -> float | None:
            status = serve.status().applications.get(APP)
            return status.last_deployed_time_s if status else None

        before = deployed_at()
        self.client.deploy_apps(ServeDeploySchema.model_validate(config or self.config))
        # The controller has taken the new config, then the app runs it.
        wait_for(lambda: deployed_at() != before, 60, "the controller to take the config")
        wait_for(app_running, what="the app to run")

    def wait_replicas(self, count: int, timeout_s: float = 180) -> list[str]:
        return wait_for(
            lambda: len(running_nodes(MODEL)) == count and app_running() and running_nodes(MODEL),
            timeout_s,
            f"{count} running model replicas",
        )


@pytest.fixture(scope="module")
def serve_cluster(tiny_cache_dir, tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.schema import ServeDeploySchema

    if ray.is_initialized():
        pytest.fail("tests/cluster need a process without Ray: run them before tests/integration")
    images_dir = tmp_path_factory.mktemp("shared-images")  # one directory all nodes see
    config = cluster_config(free_port(), str(tiny_cache_dir), str(images_dir))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"ingress_node": 1},
            "include_dashboard": False,
        },
    )
    try:
        ray.init(address=cluster.address, namespace=SERVE_NAMESPACE)
        schema = ServeDeploySchema.model_validate(config)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
        )
        serving = ServeCluster(cluster, client, config)
        for _ in range(2):
            serving.add_worker()
        serving.deploy()
        serving.images_dir = images_dir
        yield serving
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
