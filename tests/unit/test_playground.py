"""The playground's routes and the model limits it shows (no Ray); the page itself is tested in
Chromium (tests/integration/test_playground.py)."""

from starlette.testclient import TestClient

from serve_app.config import AppArgs
from serve_app.ingress import ImagesIngress


def client(tmp_path, monkeypatch, **args) -> TestClient:
    monkeypatch.setenv("TEST_API_KEYS", "sk-one")
    app_args = AppArgs(
        auth={"api_keys_env": "TEST_API_KEYS"}, storage={"local_dir": str(tmp_path)}, **args
    )
    ingress = ImagesIngress(app_args.model_dump(), {"flux-kontext-tiny": object()})
    return TestClient(ingress.__serve_build_asgi_app__())


def test_the_page_is_served_without_a_key_with_a_strict_policy(tmp_path, monkeypatch):
    app = client(tmp_path, monkeypatch)
    for path in ("/", "/playground"):
        page = app.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/playground/playground.js"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no CDN
    script = app.get("/playground/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert app.get("/playground/playground.css").headers["content-type"].startswith("text/css")
    missing = app.get("/playground/../config.py")
    assert missing.status_code == 404
    assert app.get("/playground/nothing.js").json()["error"]["code"] == "not_found"
    assert app.get("/v1/models").status_code == 401  # the API still needs the key


def test_the_playground_can_be_turned_off(tmp_path, monkeypatch):
    app = client(tmp_path, monkeypatch, playground=False)
    assert app.get("/").status_code == 404
    assert app.get("/playground/playground.js").status_code == 404


def test_models_list_their_limits(tmp_path, monkeypatch):
    app = client(tmp_path, monkeypatch, max_n=6)
    headers = {"Authorization": "Bearer sk-one"}
    [card] = app.get("/v1/models", headers=headers).json()["data"]
    limits = card["limits"]
    assert limits["min_side"] == 64 and limits["max_n"] == 6  # tiny's defaults, the app's n
    assert limits["default_size"] == "1024x1024" and "512x512" in limits["sizes"]
    assert limits["quality_steps"] == {"low": 2, "medium": 4, "high": 8}
    assert app.get("/v1/models/flux-kontext-tiny", headers=headers).json()["limits"] == limits
