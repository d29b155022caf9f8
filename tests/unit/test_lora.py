"""LoRA adapters without Ray: the registry, request parsing and resolution, the ingress over a fake
model, and the replica class on the real tiny pipeline with adapter files made in the test."""

import asyncio
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.adapters import AdapterRegistry, check_name
from serve_app.batching import group_key
from serve_app.config import LoraConfig, ModelConfig
from serve_app.contract import AdapterRef, APIError, adapter_set_id
from serve_app.lora_synthetic import write_adapter
from serve_app.model import ImageModel
from serve_app.protocol import ImageGenerationRequest
from serve_app.resolution import resolve_generation
from tests.conftest import api_error, make_job, write_test_adapters
from tests.unit.conftest import MODEL, ingress_for

# --- the registry ----------------------------------------------------------------------------


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_registry_finds_adapters_by_name_in_its_directories_in_order(tmp_path):
    first = touch(tmp_path / "one" / "style.safetensors")
    touch(tmp_path / "two" / "style.safetensors")
    touch(tmp_path / "two" / "other.safetensors")
    touch(tmp_path / "two" / "notes.txt")
    registry = AdapterRegistry("m", LoraConfig(dirs=[str(tmp_path / "one"), str(tmp_path / "two")]))
    assert registry.names() == ["other", "style"]
    assert registry.fetch("style") == first
    assert registry.exists("other") and not registry.exists("missing")
    error = api_error(registry.check, ["style", "missing"], "lora")
    assert (error.status, error.code, error.param) == (404, "adapter_not_found", "lora")
    assert "missing" in error.message


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "a\\b", "/etc/passwd", "", ".hidden", "a b"])
def test_path_like_names_are_refused_before_any_file_is_touched(tmp_path, name):
    touch(tmp_path / "x.safetensors")
    registry = AdapterRegistry("m", LoraConfig(dirs=[str(tmp_path / "sub")]))
    error = api_error(registry.fetch, name)
    assert (error.status, error.code) == (400, "invalid_adapter_name")
    api_error(check_name, name, "lora")


def test_registry_reads_an_s3_prefix_and_downloads_each_version_once(tmp_path, monkeypatch):
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="loras")
        s3.put_object(Bucket="loras", Key="flux/style.safetensors", Body=b"v1")
        s3.put_object(Bucket="loras", Key="flux/deeper/skip.safetensors", Body=b"-")
        s3.put_object(Bucket="loras", Key="other/elsewhere.safetensors", Body=b"-")
        config = LoraConfig(s3_prefix="s3://loras/flux/", s3_region="us-east-1")
        registry = AdapterRegistry("m", config, cache_dir=str(tmp_path / "cache"))
        assert registry.names() == ["style"]
        assert registry.exists("style") and not registry.exists("elsewhere")
        first = registry.fetch("style")
        assert first.read_bytes() == b"v1" and registry.fetch("style") == first
        s3.put_object(Bucket="loras", Key="flux/style.safetensors", Body=b"v2")
        second = registry.fetch("style")
        assert second != first and second.read_bytes() == b"v2"
        assert api_error(registry.fetch, "elsewhere").status == 404


# --- requests and resolution -----------------------------------------------------------------


def lora_model(tmp_path, **lora) -> dict[str, ModelConfig]:
    lora = {"dirs": [str(tmp_path)], **lora}
    return {MODEL: ModelConfig(id=MODEL, source="tiny", lora=lora)}


def resolve(models, **fields):
    request = ImageGenerationRequest.model_validate({"prompt": "a cat", **fields})
    return resolve_generation(request, models, 10)


def test_adapters_resolve_sorted_with_their_scales_and_become_the_job(tmp_path):
    models = lora_model(tmp_path)
    resolved = resolve(models, lora=[{"name": "b", "scale": 0.5}, {"name": "a"}])
    assert resolved.adapters == (AdapterRef("a", 1.0), AdapterRef("b", 0.5))
    job = resolved.to_model_request("r")
    assert job.adapters == resolved.adapters and job.adapter_set == "a+b"
    from_model = resolve(models, model=f"{MODEL}:a")
    assert from_model.adapters == (AdapterRef("a", 1.0),) and from_model.model_id == MODEL
    assert from_model.adapters_param == "model"
    assert resolve(models).adapters == ()


@pytest.mark.parametrize(
    "fields, param, code",
    [
        ({"lora": [{"name": n} for n in "abcd"]}, "lora", "too_many_adapters"),
        ({"lora": [{"name": "a", "scale": 4.5}]}, "lora", "invalid_value"),
        ({"lora": [{"name": "a", "scale": -5}]}, "lora", "invalid_value"),
        ({"lora": [{"name": "a"}, {"name": "a"}]}, "lora", "invalid_value"),
        ({"lora": [{"name": "../x"}]}, "lora", "invalid_adapter_name"),
        ({"model": f"{MODEL}:../x"}, "model", "invalid_adapter_name"),
        ({"model": f"{MODEL}:a", "lora": [{"name": "b"}]}, "lora", "invalid_value"),
    ],
)
def test_bad_adapter_requests_are_400s_naming_the_parameter(tmp_path, fields, param, code):
    error = api_error(resolve, lora_model(tmp_path), **fields)
    assert (error.status, error.param, error.code) == (400, param, code)


def test_adapters_on_a_model_without_any_are_404s(tmp_path):
    models = {MODEL: ModelConfig(id=MODEL, source="tiny")}
    for fields, param in (({"lora": [{"name": "a"}]}, "lora"), ({"model": f"{MODEL}:a"}, "model")):
        error = api_error(resolve, models, **fields)
        assert (error.status, error.code, error.param) == (404, "adapter_not_found", param)


@pytest.mark.parametrize("scale", ["0.5", True, None, [1]])
def test_a_scale_must_be_a_json_number(scale):
    with pytest.raises(ValueError, match="scale"):
        ImageGenerationRequest.model_validate(
            {"prompt": "p", "lora": [{"name": "a", "scale": scale}]}
        )


def test_jobs_share_a_call_only_with_equal_adapters_and_scales():
    plain = make_job()
    a = make_job(adapters=(AdapterRef("a", 1.0),))
    assert group_key(a) == group_key(make_job(adapters=(AdapterRef("a", 1.0),)))
    assert len({group_key(j) for j in (plain, a, make_job(adapters=(AdapterRef("a", 0.5),)))}) == 3
    assert adapter_set_id((AdapterRef("b"), AdapterRef("a", 2))) == "a+b"


# --- the ingress over a fake model -----------------------------------------------------------


@pytest.fixture
def lora_app(tmp_path, fake, app_args):
    from starlette.testclient import TestClient

    touch(tmp_path / "loras" / "style.safetensors")
    touch(tmp_path / "loras" / "ink.safetensors")
    app_args["models"] = [
        {"id": MODEL, "source": "tiny", "lora": {"dirs": [str(tmp_path / "loras")]}}
    ]
    return TestClient(ingress_for(app_args, fake).__serve_build_asgi_app__())


def test_models_list_each_adapter_under_its_model(lora_app):
    cards = lora_app.get("/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL, f"{MODEL}:ink", f"{MODEL}:style"]
    assert cards[1]["parent"] == MODEL and cards[0]["parent"] is None
    assert lora_app.get(f"/v1/models/{MODEL}:style").json()["parent"] == MODEL
    assert lora_app.get(f"/v1/models/{MODEL}:nope").status_code == 404


def test_the_job_carries_the_adapters_and_the_images_say_so(lora_app, fake):
    body = {"prompt": "a cat", "size": "256x256", "n": 2}
    answer = lora_app.post("/v1/images/generations", json={**body, "lora": [
        {"name": "style", "scale": 0.5}, {"name": "ink"}]})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert fake.jobs[-1].adapters == (AdapterRef("ink", 1.0), AdapterRef("style", 0.5))
    expected = [{"name": "ink", "scale": 1.0}, {"name": "style", "scale": 0.5}]
    assert [item["lora"] for item in answer.json()["data"]] == [expected, expected]
    plain = lora_app.post("/v1/images/generations", json=body).json()
    assert [item["lora"] for item in plain["data"]] == [None, None]


def test_an_unknown_adapter_is_a_404_and_no_job(lora_app, fake):
    for body, param in (
        ({"lora": [{"name": "style"}, {"name": "missing"}]}, "lora"),
        ({"model": f"{MODEL}:missing"}, "model"),
    ):
        answer = lora_app.post("/v1/images/generations", json={"prompt": "p", **body})
        error = answer.json()["error"]
        assert answer.status_code == 404 and error["code"] == "adapter_not_found"
        assert error["param"] == param and "missing" in error["message"]
    assert fake.jobs == []


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    return buffer.getvalue()


def test_multipart_takes_lora_as_json_text_or_the_sdk_bracket_fields(lora_app, fake):
    files = {"image": ("a.png", png(), "image/png")}
    as_json = [{"name": "style", "scale": 0.25}]
    answer = lora_app.post(
        "/v1/images/edits", data={"prompt": "p", "lora": json.dumps(as_json)}, files=files
    )
    assert answer.status_code == 200, answer.text
    assert fake.jobs[-1].adapters == (AdapterRef("style", 0.25),)
    brackets = {"prompt": "p", "lora[][name]": ["style", "ink"], "lora[][scale]": ["0.5", "2"]}
    answer = lora_app.post("/v1/images/edits", data=brackets, files=files)
    assert answer.status_code == 200, answer.text
    assert fake.jobs[-1].adapters == (AdapterRef("ink", 2.0), AdapterRef("style", 0.5))
    uneven = {"prompt": "p", "lora[][name]": ["style", "ink"], "lora[][scale]": "0.5"}
    answer = lora_app.post("/v1/images/edits", data=uneven, files=files)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "lora"


# --- the replica on the tiny pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_cache_dir):
    path = tmp_path_factory.mktemp("adapters")
    transformer = write_test_adapters(path, tiny_cache_dir)
    wrong = {
        key: torch.cat([value, value[:, :1]], dim=1) if ".lora_A." in key else value
        for key, value in write_adapter(transformer, path / "tmp.safetensors", seed=4).items()
    }
    from safetensors.torch import save_file

    save_file(wrong, str(path / "wrong.safetensors"))
    return path


@pytest.fixture(scope="module")
def replica(tiny_cache_dir, adapter_dir):
    config = {"id": "tiny", "source": "tiny", "cache_dir": tiny_cache_dir, "warmup": False,
              "lora": {"dirs": [str(adapter_dir)]}}  # fmt: skip
    return ImageModel(config)


def run(replica, *adapters, seed=1):
    job = make_job(seeds=(seed,), width=64, height=64, adapters=tuple(adapters))
    [image] = asyncio.run(replica.generate(job)).images
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_adapter_changes_the_image_and_scale_zero_or_none_is_the_base_exactly(replica):
    base = run(replica)
    with_a = run(replica, AdapterRef("a", 1.0))
    assert (pixels(with_a) != pixels(base)).mean() > 0.3
    assert run(replica, AdapterRef("a", 1.0)) == with_a  # the same request, the same bytes
    assert run(replica, AdapterRef("a", 0.0)) == base
    assert run(replica) == base  # base weights after adapters were loaded and used
    assert "a" in replica.loaded_adapters()


def test_two_adapters_differ_from_each_alone_and_kohya_files_load(replica):
    a, b = run(replica, AdapterRef("a", 1.0)), run(replica, AdapterRef("b", 1.0))
    both = run(replica, AdapterRef("a", 1.0), AdapterRef("b", 0.5))
    assert len({a, b, both}) == 3
    kohya = run(replica, AdapterRef("k", 1.0))
    assert kohya not in (a, b, run(replica))


@pytest.mark.parametrize("name, words", [("corrupt", "could not be read"), ("wrong", "fit")])
def test_a_bad_adapter_file_is_a_422_naming_it_and_nothing_is_loaded(replica, name, words):
    before = replica.loaded_adapters()
    with pytest.raises(APIError) as info:
        run(replica, AdapterRef(name, 1.0))
    error = info.value
    assert (error.status, error.code, error.param) == (422, "adapter_invalid", "lora")
    assert repr(name) in error.message and words in error.message
    assert replica.loaded_adapters() == before
    replica.check_health()
    assert run(replica) == run(replica)  # still serving
