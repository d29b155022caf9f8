"""url storage: signed local links and an S3-compatible bucket (a local moto server)."""

import os
import time

import httpx
import pytest

from serve_app.config import StorageConfig
from serve_app.contract import APIError
from serve_app.storage import LocalImageStore, S3ImageStore, make_store


@pytest.fixture
def store(tmp_path):
    return LocalImageStore(tmp_path, b"secret", ttl_s=60)


def parts(url: str):
    path, query = url.split("?")
    params = dict(pair.split("=") for pair in query.split("&"))
    return path.rsplit("/", 1)[1], params["expires"], params["signature"]


def test_signed_link_round_trip(store):
    url = store.save(b"webp bytes", "webp", "https://img.example.com/")
    assert url.startswith("https://img.example.com/v1/images/files/")
    name, expires, signature = parts(url)
    assert store.read(name, expires, signature) == (b"webp bytes", "image/webp")
    assert int(expires) - time.time() == pytest.approx(60, abs=2)


def status_of(fn, *args) -> int:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value.status


def test_forged_expired_and_unknown_links(store):
    name, expires, signature = parts(store.save(b"x", "png", "http://h"))
    assert status_of(store.read, name, str(int(expires) + 1), signature) == 403
    assert status_of(store.read, name, expires, "0" * 64) == 403
    assert status_of(store.read, name, None, None) == 403
    other = LocalImageStore(store.directory, b"other secret", 60)
    assert status_of(other.read, name, expires, signature) == 403
    past = int(time.time()) - 1
    assert status_of(store.read, name, str(past), store.sign(name, past)) == 404
    assert status_of(store.read, "../../etc/passwd", expires, signature) == 404
    missing = "A" * 24 + ".png"
    assert status_of(store.read, missing, expires, store.sign(missing, int(expires))) == 404


def test_cleanup_removes_only_expired_files(store):
    old_name, *_ = parts(store.save(b"old", "png", "http://h"))
    new_name, *_ = parts(store.save(b"new", "png", "http://h"))
    old_path = store.directory / old_name
    os.utime(old_path, (time.time() - 120, time.time() - 120))
    assert store.cleanup() == 1
    assert not old_path.exists() and (store.directory / new_name).exists()


def test_local_store_uses_the_secret_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET", "s3cr3t")
    config = StorageConfig(local_dir=str(tmp_path), secret_env="MY_SECRET")
    assert make_store(config).secret == b"s3cr3t"


def test_s3_config_needs_a_bucket():
    with pytest.raises(ValueError, match="s3_bucket"):
        StorageConfig(backend="s3")


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_store_presigns_and_cleans_up(s3_endpoint):
    config = StorageConfig(
        backend="s3", s3_bucket="images", s3_endpoint_url=s3_endpoint, url_ttl_s=600
    )
    store = make_store(config)
    assert isinstance(store, S3ImageStore)
    store.client.create_bucket(Bucket="images")
    url = store.save(b"jpeg bytes", "jpeg", "ignored")
    assert "X-Amz-Signature" in url and "X-Amz-Expires=600" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"jpeg bytes"
    assert response.headers["content-type"] == "image/jpeg"
    assert store.cleanup() == 0
    store.ttl_s = -1  # everything is now past its lifetime
    assert store.cleanup() == 1
    assert store.client.list_objects_v2(Bucket="images").get("KeyCount") == 0
