"""API keys: hashing, constant-time lookup, names; enforced by the ingress (no Ray needed)."""

import asyncio
import re

import openai
import pytest
from starlette.testclient import TestClient

from serve_app.auth import KeyStore
from serve_app.config import AppArgs, AuthConfig
from serve_app.contract import APIError
from serve_app.ingress import ImagesIngress
from serve_app.routes import FILES_ROUTE, JOB_FILES_ROUTE, ROUTES, features, served


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYS", "k1, k2")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("alice: sk-alice\nbob: sk-bob\n")
    store = KeyStore.from_config(AuthConfig(api_keys_env="KEYS", api_keys_file=str(keys_file)))
    assert len(store) == 4
    assert store.identify("Bearer k2") == "env-2"
    assert store.identify("bearer sk-alice") == "alice"
    assert "sk-alice" not in repr(store.__dict__)  # only hashes are kept


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer wrong", "Basic sk-alice", "sk-alice"]
)
def test_bad_credentials_are_401(header):
    with pytest.raises(APIError) as info:
        KeyStore({"alice": "sk-alice"}).identify(header)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert info.value.headers["WWW-Authenticate"] == "Bearer"


def test_auth_off_unless_configured(monkeypatch):
    assert KeyStore.from_config(AuthConfig()) is None
    monkeypatch.delenv("UNSET_KEYS", raising=False)
    with pytest.raises(ValueError, match="empty or unset"):
        KeyStore.from_config(AuthConfig(api_keys_env="UNSET_KEYS"))


class SlowHandle:
    """Stands in for the model deployment handle: never answers (for the time-limit test)."""

    class _Method:
        def remote(self, job):
            return asyncio.sleep(3600)

    generate = _Method()


@pytest.fixture
def app(monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_API_KEYS", "sk-one,sk-two")
    args = AppArgs(
        auth={"api_keys_env": "TEST_API_KEYS"},
        limits={"request_timeout_s": 0.5},
        storage={"local_dir": str(tmp_path)},
    )
    ingress = ImagesIngress(args.model_dump(), {"flux-kontext-tiny": SlowHandle()})
    return TestClient(ingress.__serve_build_asgi_app__())


def test_keys_are_enforced_on_v1_routes_only(app):
    assert app.get("/v1/models").status_code == 401
    response = app.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    ok = app.get("/v1/models", headers={"Authorization": "Bearer sk-two"})
    assert ok.status_code == 200
    assert app.get("/openapi.json").status_code == 200
    assert app.get("/v1/images/files/" + "a" * 24 + ".png").status_code == 403  # signed links


def test_stock_sdk_with_and_without_a_key(app):
    good = openai.OpenAI(base_url="http://testserver/v1", api_key="sk-one", http_client=app)
    assert [m.id for m in good.models.list()] == ["flux-kontext-tiny"]
    bad = openai.OpenAI(
        base_url="http://testserver/v1", api_key="sk-wrong", http_client=app, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.generate(prompt="x")
    assert info.value.code == "invalid_api_key"
    # With a good key, validation runs (and names the bad field).
    with pytest.raises(openai.BadRequestError) as info:
        good.images.generate(prompt="x", size="7x7")
    assert info.value.param == "size"


def sample_path(template: str) -> str:
    """A concrete path for a route template: each `{param}` (or `{param:conv}`) becomes `x`."""
    return re.sub(r"\{[^}]+\}", "x", template)


def test_the_route_tables_access_is_the_key_policy():
    """`/v1/...` is keyed, except the signed image links; everything else is open."""
    signed = (FILES_ROUTE + "/", JOB_FILES_ROUTE + "/")
    for route in ROUTES:
        path = sample_path(route.path)
        if path.startswith(signed):
            assert route.access == "signed", route.path
        elif path.startswith("/v1/"):
            assert route.access == "keyed", route.path
        else:
            assert route.access == "public", route.path


def test_every_keyed_route_and_method_needs_the_key(app):
    """Driven by the table: no keyed route is reachable without a key (the handlers never run:
    the frame answers 401 first)."""
    keyed = [route for route in served(features(AppArgs())) if route.access == "keyed"]
    assert keyed
    for route in keyed:
        for method in route.methods:
            response = app.request(method, sample_path(route.path))
            assert response.status_code == 401, (method, route.path)
            assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_paths_and_methods_are_answered_by_the_router_without_a_key(app):
    """No route matched, no frame ran: 404 / 405 in the error envelope, before any key check
    (as before the route table; the paths are public in `/openapi.json` anyway)."""
    missing = app.get("/v1/no-such-route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = app.delete("/v1/models")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in wrong.headers["allow"]
