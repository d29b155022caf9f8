"""LoRA adapters end to end: the openai SDK against the running app, adapters routed with Ray
Serve model multiplexing, the replica's LRU, bad inputs, and routing across two replicas."""

import base64
import copy
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import APP_NAME, MAX_LOADED

pytestmark = pytest.mark.integration

MODEL = "flux-kontext-tiny"
DEPLOYMENT = f"ImageModel-{MODEL}"


def generate(client, lora=None, seed=7, **fields) -> bytes:
    extra = {"seed": seed, **({"lora": lora} if lora is not None else {})}
    fields = {"prompt": "a red fox", "size": "128x128", "quality": "low", **fields}
    answer = client.images.generate(**fields, extra_body=extra)
    return base64.b64decode(answer.data[0].b64_json)


def replica_adapters() -> list[str]:
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP_NAME)
    return handle.loaded_adapters.remote().result()


def wait_for(condition, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def base_image(client) -> bytes:
    return generate(client)


def test_an_adapter_changes_the_image_reproducibly_and_scale_zero_is_the_base(client, base_image):
    with_a = generate(client, [{"name": "a", "scale": 1.0}])
    assert with_a != base_image
    assert generate(client, [{"name": "a", "scale": 1.0}]) == with_a
    assert generate(client, [{"name": "a", "scale": 0.0}]) == base_image
    assert generate(client) == base_image  # the base weights exactly, after adapter calls
    assert generate(client, model=f"{MODEL}:a") == with_a  # one adapter at scale 1
    kohya = generate(client, [{"name": "k"}])
    assert kohya not in (base_image, with_a)


def test_two_adapters_with_weights_differ_from_each_alone(client):
    a = generate(client, [{"name": "a"}])
    b = generate(client, [{"name": "b", "scale": 0.5}])
    both = generate(client, [{"name": "a"}, {"name": "b", "scale": 0.5}])
    assert len({a, b, both}) == 3
    assert generate(client, [{"name": "b", "scale": 0.5}, {"name": "a"}]) == both  # order-free


def test_concurrent_requests_with_different_adapters_each_equal_the_request_alone(client):
    """Different adapter sets never share a call: nothing leaks across batches."""
    variants = [None, [{"name": "a"}], [{"name": "b"}], [{"name": "a"}, {"name": "b"}]]
    alone = [generate(client, lora) for lora in variants]
    with ThreadPoolExecutor(len(variants)) as pool:
        for _ in range(2):  # (copies of one request would batch, and batches round differently)
            together = list(pool.map(lambda lora: generate(client, lora), variants))
            assert together == alone
    assert generate(client) == alone[0]


def test_the_response_names_the_adapters_of_each_image(http):
    body = {"prompt": "p", "size": "64x64", "quality": "low", "n": 2}
    answer = http.post("/v1/images/generations", json={**body, "model": f"{MODEL}:a"})
    assert [item["lora"] for item in answer.json()["data"]] == [[{"name": "a", "scale": 1.0}]] * 2


def test_multipart_edits_take_adapters_from_the_sdk(client, http):
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), "teal").save(buffer, "PNG")
    png = buffer.getvalue()
    fields = {"prompt": "make it red", "size": "128x128", "quality": "low"}
    lora = [{"name": "b", "scale": 0.75}, {"name": "a", "scale": 1.5}]

    def edit(extra):
        image = ("in.png", png, "image/png")
        answer = client.images.edit(image=image, **fields, extra_body={"seed": 3, **extra})
        return base64.b64decode(answer.data[0].b64_json)

    plain, with_lora = edit({}), edit({"lora": lora})  # the SDK sends lora[][name] fields
    assert plain != with_lora
    as_json_text = http.post(
        "/v1/images/edits",
        data={**fields, "seed": "3", "lora": str(lora).replace("'", '"')},
        files={"image": ("in.png", png, "image/png")},
    )
    assert base64.b64decode(as_json_text.json()["data"][0]["b64_json"]) == with_lora


def test_the_replica_keeps_the_most_recently_used_adapter_sets(client):
    assert MAX_LOADED == 2
    for name in ("a", "b", "k"):
        generate(client, [{"name": name}])
    assert wait_for(lambda: replica_adapters() == ["b", "k"]), replica_adapters()
    a = generate(client, [{"name": "a"}])  # reloaded; evicts b, the least recently used
    assert wait_for(lambda: replica_adapters() == ["a", "k"]), replica_adapters()
    assert generate(client, [{"name": "a"}]) == a


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"lora": [{"name": "nope"}]}, 404, "lora", "adapter_not_found"),
        ({"model": f"{MODEL}:nope"}, 404, "model", "adapter_not_found"),
        ({"lora": [{"name": n} for n in "abkx"]}, 400, "lora", "too_many_adapters"),
        ({"lora": [{"name": "a", "scale": 9}]}, 400, "lora", "invalid_value"),
        ({"lora": [{"name": "a", "scale": "1"}]}, 400, "lora.0.scale", "invalid_value"),
        ({"lora": [{"name": "../a"}]}, 400, "lora", "invalid_adapter_name"),
        ({"lora": [{"name": "corrupt"}]}, 422, "lora", "adapter_invalid"),
    ],
)
def test_bad_adapter_requests_get_the_documented_error_and_load_nothing(
    http, body, status, param, code
):
    before = replica_adapters()
    answer = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64", **body})
    error = answer.json()["error"]
    assert (answer.status_code, error["param"], error["code"]) == (status, param, code), error
    assert replica_adapters() == before
    ok = http.post("/v1/images/generations", json={"prompt": "p", "size": "64x64"})
    assert ok.status_code == 200  # the replica stays healthy


def test_models_list_the_adapters(client):
    ids = [model.id for model in client.models.list()]
    assert ids == [MODEL, f"{MODEL}:a", f"{MODEL}:b", f"{MODEL}:corrupt", f"{MODEL}:k"]


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(serve_config, redeploy):
    """Two model replicas in a second app: Serve's multiplexed routing sends repeated requests
    for one adapter set to the replica that loaded it (read from the replica's own id)."""
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    routed = copy.deepcopy(app)
    routed["name"], routed["route_prefix"] = "routing", "/routing"
    for deployment in routed["deployments"]:
        if deployment["name"] == DEPLOYMENT:
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 2
            deployment["ray_actor_options"] = {"num_cpus": 0.5}
    config["applications"].append(routed)
    redeploy(config)
    from ray import serve

    def routing_app_running() -> bool:
        status = serve.status().applications.get("routing")
        return status is not None and status.status == "RUNNING"

    assert wait_for(routing_app_running, timeout_s=120), serve.status().applications
    port = config["http_options"]["port"]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/routing", timeout=60) as http:

            def served_by(lora) -> str:
                body = {"prompt": "p", "size": "64x64", "quality": "low", "lora": lora}
                answer = http.post("/v1/images/generations", json=body)
                assert answer.status_code == 200, answer.text
                return answer.headers["x-served-by"]

            first_a = served_by([{"name": "a"}])
            time.sleep(1)  # the replica reports its sets every 0.1 s; routers learn them
            assert {served_by([{"name": "a", "scale": s}]) for s in (1, 0.5, 2, 1, 1)} == {first_a}
            first_b = served_by([{"name": "b"}])
            assert first_b != first_a  # a new set goes to the replica with the fewest sets
            time.sleep(1)
            assert {served_by([{"name": "b"}]) for _ in range(4)} == {first_b}
            assert {served_by([{"name": "a"}]) for _ in range(4)} == {first_a}
    finally:
        redeploy(serve_config)
