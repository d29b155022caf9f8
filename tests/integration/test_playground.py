"""The playground in a real browser: Debian's Chromium driven by Playwright, against the live app.

Screenshots go to $PLAYGROUND_SCREENSHOTS (default results/screenshots/), kept as artifacts.
"""

from __future__ import annotations

import base64
import copy
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("PLAYGROUND_SCREENSHOTS", ROOT / "results" / "screenshots"))
# As this machine's browser tests run it: no network chatter, no sandbox as root.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: scripts/setup.sh installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A fresh page on the playground that records console errors and page crashes."""

    def __init__(self, browser, base_url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(f"{base_url}/")

    def models(self) -> list[str]:
        self.page.locator("#model option").first.wait_for(state="attached")
        return self.page.eval_on_selector_all(
            "#model option", "options => options.map(o => o.value)"
        )

    def status(self, prefix: str, timeout_s: float = 60) -> str:
        locator = self.page.locator("#status")
        locator.filter(has_text=prefix).wait_for(timeout=timeout_s * 1000)
        return locator.inner_text()

    def gallery(self) -> list[Image.Image]:
        sources = self.page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.src)")
        return [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in sources]

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.page.close()


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def noise_png(path: Path, size: int = 128) -> Path:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


RECORD_FORM_FIELDS = """() => {
  const send = window.fetch;
  window.fetch = async (url, options) => {
    if (options && options.body instanceof FormData) {
      const fields = {};
      for (const [name, value] of options.body.entries()) {
        if (typeof value === "string") { fields[name] = value; continue; }
        const bytes = new Uint8Array(await value.arrayBuffer());
        let binary = "";
        for (const byte of bytes) binary += String.fromCharCode(byte);
        fields[name] = btoa(binary);
      }
      window.sentFields = fields;
    }
    return send(url, options);
  };
}"""


def test_the_page_loads_without_errors_and_lists_the_models(browser, base_url):
    page = Page(browser, base_url)
    try:
        # The model, then its LoRA adapters as `<model>:<adapter>` (they work as `model`).
        assert page.models()[0] == "flux-kontext-tiny"
        assert all(m.startswith("flux-kontext-tiny:") for m in page.models()[1:])
        assert "64–2048 px" in page.page.inner_text("#limits")  # the model's limits, shown
        # Each mode shows its own fields.
        visible = page.page.is_visible
        assert visible("#prompt") and not visible("#images-field") and not visible("#mask-field")
        page.page.check('input[name="mode"][value="variation"]')
        assert visible("#images-field") and not visible("#prompt") and not visible("#mask-field")
        page.page.check('input[name="mode"][value="generate"]')
        assert not visible("#size-custom")
        page.page.select_option("#size", "custom")
        assert visible("#size-custom")
        page.page.select_option("#size", "auto")
        # Labelled controls: every input, select and textarea has a label or an aria-label.
        unlabelled = page.page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea')]
                 .filter(el => el.type !== 'radio' && !el.labels.length
                               && !el.getAttribute('aria-label'))
                 .map(el => el.id)"""
        )
        assert unlabelled == []
        page.shot("loaded")
        page.page.set_viewport_size({"width": 380, "height": 800})  # a narrow window
        overflow = page.page.evaluate("document.documentElement.scrollWidth - innerWidth")
        assert overflow <= 0
        page.shot("narrow")
    finally:
        page.close()
    assert page.errors == []


def test_generate_shows_previews_then_the_image_the_sdk_gets(browser, base_url, client):
    page = Page(browser, base_url)
    try:
        page.models()
        # Count every preview as it arrives (each replaces the last for its image).
        page.page.evaluate(
            """() => { window.previews = 0; new MutationObserver(m => m.forEach(r =>
                 window.previews += r.addedNodes.length)).observe(
                 document.getElementById('previews'), {childList: true}); }"""
        )
        page.page.fill("#prompt", "a lighthouse at dawn")
        page.page.select_option("#size", "512x512")
        page.page.fill("#seed", "42")
        page.page.select_option("#partials", "2")
        page.page.click("#submit")
        page.status("Done")
        assert page.page.evaluate("window.previews") == 2
        [image] = page.gallery()
        assert "seed 42" in page.page.inner_text("#gallery figcaption")
        page.page.fill("#seed", "")
        page.page.click("#gallery button.seed")  # click a seed to reuse it
        assert page.page.input_value("#seed") == "42"
        link = page.page.locator("#gallery a[download]")
        assert link.get_attribute("download") == "image-42.png"
        assert "usage:" in page.page.inner_text("#usage") and "total" in page.page.inner_text(
            "#usage"
        )
        page.shot("generate")
    finally:
        page.close()
    assert page.errors == []
    sdk = client.images.generate(
        prompt="a lighthouse at dawn", size="512x512", quality="auto", extra_body={"seed": 42}
    )
    expected = Image.open(io.BytesIO(base64.b64decode(sdk.data[0].b64_json)))
    assert image.size == (512, 512) and np.array_equal(rgb(image), rgb(expected))


def test_edit_with_a_painted_mask(browser, base_url, tmp_path):
    source = noise_png(tmp_path / "source.png")
    page = Page(browser, base_url)
    try:
        page.models()
        page.page.check('input[name="mode"][value="edit"]')
        page.page.set_input_files("#images", str(source))
        canvas = page.page.locator("#mask-canvas")
        canvas.wait_for()
        page.page.fill("#prompt", "a hole")
        page.page.evaluate("document.getElementById('brush').value = 24")
        box = canvas.bounding_box()
        scale = box["width"] / 128  # CSS pixels per image pixel
        y = box["y"] + 64 * scale
        page.page.mouse.move(box["x"] + 30 * scale, y)
        page.page.mouse.down()
        for x in range(30, 101, 5):
            page.page.mouse.move(box["x"] + x * scale, y)
        page.page.mouse.up()
        # What the page hands to fetch(): the multipart fields it sends (Chromium does not
        # report multipart bodies built from files to Playwright).
        page.page.evaluate(RECORD_FORM_FIELDS)
        page.page.click("#submit")
        page.status("Done")
        [result] = page.gallery()
        page.shot("edit")
        sent = page.page.evaluate("window.sentFields")
    finally:
        page.close()
    assert page.errors == []
    assert sent["image"] == base64.b64encode(source.read_bytes()).decode()  # the file as chosen
    assert sent["prompt"] == "a hole"
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).convert("RGBA"))
    alpha = alpha[:, :, 3]
    assert alpha.shape == (128, 128)
    clear = alpha == 0
    rows, cols = np.nonzero(clear)
    radius = 12 / scale  # the brush is 24 screen pixels wide; the canvas shows 128 px scaled
    # Transparent exactly around the stroke: along it, and nowhere farther than the brush.
    assert clear[64, 30:101].all() and clear[round(64 - radius / 2), 30:101].all()
    assert rows.min() >= 64 - radius - 1 and rows.max() <= 64 + radius + 1
    assert cols.min() >= 30 - radius - 1 and cols.max() <= 100 + radius + 1
    assert alpha[0, 0] == alpha[127, 127] == 255
    original = rgb(Image.open(source))
    out = rgb(result)
    assert out.shape == original.shape
    assert np.array_equal(out[alpha == 255], original[alpha == 255])
    assert (out[clear] != original[clear]).any()


def test_variations_from_the_keyboard(browser, base_url, tmp_path):
    """Variations of an uploaded image, the form driven by the keyboard alone."""
    source = noise_png(tmp_path / "source.png", size=64)
    page = Page(browser, base_url)
    try:
        page.models()
        page.page.check('input[name="mode"][value="variation"]')
        page.page.set_input_files("#images", str(source))
        page.page.focus("#n")
        page.page.keyboard.press("Control+A")
        page.page.keyboard.type("2")
        page.page.focus("#submit")
        page.page.keyboard.press("Enter")
        page.status("Done")
        images = page.gallery()
        page.shot("variations")
    finally:
        page.close()
    assert page.errors == []
    assert len(images) == 2 and images[0].size == images[1].size
    assert not np.array_equal(rgb(images[0]), rgb(images[1]))  # seeds seed and seed + 1


def test_a_bad_custom_size_shows_the_servers_error_next_to_the_field(browser, base_url, http):
    page = Page(browser, base_url)
    try:
        page.models()
        page.page.fill("#prompt", "x")
        page.page.select_option("#size", "custom")
        page.page.fill("#size-custom", "7x7")
        page.page.click("#submit")
        page.page.locator("#size-error").filter(has_text="7").wait_for(timeout=30_000)
        shown = page.page.inner_text("#size-error")
        request_id = page.page.evaluate("document.body.dataset.request")
        page.shot("size-error")
    finally:
        page.close()
    # The same request by hand (same request id, which the message quotes): the same message.
    expected = http.post(
        "/v1/images/generations",
        json={"prompt": "x", "size": "7x7"},
        headers={"x-request-id": request_id},
    )
    assert expected.status_code == 400
    assert shown == expected.json()["error"]["message"]


def serve_logs() -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("replica_*.log"))


def test_cancel_stops_a_long_generation(browser, base_url, client):
    page = Page(browser, base_url)
    try:
        page.models()
        page.page.fill("#prompt", "a long one")
        page.page.select_option("#size", "custom")
        page.page.fill("#size-custom", "1024x1024")
        page.page.fill("#steps", "100")
        page.page.click("#submit")
        working = page.status("Working")
        request_id = working.split("request ")[1].rstrip(")")
        time.sleep(1.5)
        page.page.click("#cancel")
        assert page.status("Cancelled") == f"Cancelled (request {request_id})"
    finally:
        page.close()
    deadline = time.monotonic() + 30
    while f"request {request_id} cancelled" not in serve_logs():
        assert time.monotonic() < deadline, "the server did not log the cancellation"
        time.sleep(0.5)
    started = time.monotonic()
    assert client.images.generate(prompt="after", size="64x64").data[0].b64_json
    assert time.monotonic() - started < 20  # the replica is free again


@pytest.fixture
def keyed_app(serve_config, redeploy):
    """The session app with API keys on, for one test; the plain app again afterwards."""
    keyed = copy.deepcopy(serve_config)
    [app] = keyed["applications"]
    app["args"]["auth"] = {"api_keys_env": "PLAYGROUND_KEYS"}
    app["runtime_env"]["env_vars"]["PLAYGROUND_KEYS"] = "sk-playground"
    redeploy(keyed)
    try:
        yield "sk-playground"
    finally:
        redeploy(serve_config)


def test_api_keys_without_a_key_the_401_with_one_it_works(browser, base_url, keyed_app):
    page = Page(browser, base_url)  # the page itself needs no key
    try:
        page.page.locator("#error").filter(has_text="API key").wait_for(timeout=30_000)
        assert "401" in page.page.inner_text("#status")
        page.shot("no-key")
        page.page.fill("#api-key", keyed_app)
        page.page.press("#api-key", "Enter")
        page.page.locator("#api-key").blur()
        # The model, then its LoRA adapters as `<model>:<adapter>` (they work as `model`).
        assert page.models()[0] == "flux-kontext-tiny"
        assert all(m.startswith("flux-kontext-tiny:") for m in page.models()[1:])
        page.page.fill("#prompt", "with a key")
        page.page.select_option("#size", "custom")
        page.page.fill("#size-custom", "64x64")
        page.page.click("#submit")
        page.status("Done")
        assert len(page.gallery()) == 1
        stored = page.page.evaluate("sessionStorage.getItem('serve_app_api_key')")
    finally:
        page.close()
    assert stored == keyed_app
    # Console errors here are the browser's own lines for the 401 response; nothing else.
    assert all("401" in error for error in page.errors), page.errors
