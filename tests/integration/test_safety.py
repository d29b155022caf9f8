"""Moderation and provenance through the stock SDK, on the session app with a second, guarded
model: a deny list, the tiny text and image classifiers (tests/moderation_models.py), C2PA
signing with a throwaway CA, and API keys of which only `alice` may send `moderation: low`.
The session's own model shows the default: no moderation, and provenance marks on."""

import base64
import copy
import io
import json
import subprocess
import time

import httpx
import openai
import pytest
import yaml
from PIL import Image

from serve_app.provenance import read_c2pa
from tests.c2pa_certs import make_signing_identity
from tests.integration.conftest import BATCH_WAIT_S
from tests.moderation_models import CLEAN_PROMPT, FLAGGED_PROMPT, red_image

pytestmark = pytest.mark.integration

GUARDED = "flux-kontext-guarded"
DENIED = "zebraquokka gore at noon"  # `gore` is on the deny list; the first word is unique
ALICE, BOB = "sk-alice-0123456789abcdef", "sk-bob-0123456789abcdef"
QUICK = {"size": "64x64", "quality": "low"}
ASYNC = {"Prefer": "respond-async"}
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"


@pytest.fixture(scope="module")
def guarded(base_url, serve_config, redeploy, tiny_cache_dir, moderation_models, tmp_path_factory):
    """The session app plus a guarded model, behind API keys (restored afterwards)."""
    root = tmp_path_factory.mktemp("safety")
    chain, key, root_pem = make_signing_identity(root)
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump({"alice": ALICE, "bob": BOB}))
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    app["args"]["auth"] = {"api_keys_file": str(keys), "moderation_low_keys": ["alice"]}
    app["args"]["models"].append(
        {
            "id": GUARDED,
            "source": "tiny",
            "cache_dir": tiny_cache_dir,
            "safety": {
                "enabled": True,
                "blocked_terms": ["gore"],
                "text_classifier": {
                    "source": moderation_models["text"],
                    "flagged_labels": [moderation_models["text_label"]],
                    "threshold": float(moderation_models["text_threshold"]),
                },
                "image_classifier": {
                    "source": moderation_models["image"],
                    "flagged_labels": ["nsfw"],
                    "threshold": 0.5,
                    "low_threshold": 1.0,
                },
            },
            "provenance": {"c2pa": {"cert_file": str(chain), "key_file": str(key)}},
        }
    )
    app["deployments"].append(
        {
            "name": "ImageModel-" + GUARDED,
            "ray_actor_options": {"num_cpus": 0.01},
            "user_config": {"max_batch_images": 8, "batch_wait_timeout_s": BATCH_WAIT_S},
        }
    )
    redeploy(config, timeout_s=300)
    try:
        yield {"root_pem": root_pem}
    finally:
        redeploy(serve_config)


def sdk(base_url, key=ALICE):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(seed: int) -> bytes:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


def blocked(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value
    assert error.code == "moderation_blocked", error.body
    assert error.type == "image_generation_user_error"
    return error


def exif_marks(data: bytes, tmp_path, suffix: str) -> dict:
    path = tmp_path / f"image.{suffix}"
    path.write_bytes(data)
    out = subprocess.run(
        ["exiftool", "-j", "-n", "-XMP-iptcExt:DigitalSourceType", "-EXIF:Software", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)[0]


def c2pa_actions(manifest: dict) -> list[dict]:
    labels = [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    return labels[0]["data"]["actions"]


def test_a_denied_prompt_is_refused_on_every_endpoint_and_a_stream(base_url, guarded):
    client = sdk(base_url)
    error = blocked(lambda: client.images.generate(model=GUARDED, prompt=DENIED, **QUICK))
    assert "prompt" in error.message and "zebraquokka" not in error.message
    blocked(
        lambda: client.images.edit(
            model=GUARDED, prompt=DENIED, image=("in.png", noise_png(1), "image/png"), **QUICK
        )
    )
    blocked(
        lambda: client.images.generate(
            model=GUARDED, prompt=DENIED, stream=True, partial_images=1, **QUICK
        )
    )
    error = blocked(lambda: client.images.generate(model=GUARDED, prompt=FLAGGED_PROMPT, **QUICK))
    assert "text classifier" in error.message


def test_a_flagged_input_image_is_refused_naming_it(base_url, guarded):
    client = sdk(base_url)
    images = [("a.png", noise_png(1), "image/png"), ("b.png", png(red_image()), "image/png")]
    error = blocked(
        lambda: client.images.edit(model=GUARDED, prompt=CLEAN_PROMPT, image=images, **QUICK)
    )
    assert "input image 2" in error.message
    blocked(
        lambda: client.images.create_variation(
            model=GUARDED, image=("red.png", png(red_image()), "image/png"), size="64x64"
        )
    )
    # the same edit with two clean inputs passes every check, outputs included
    clean = [images[0], ("c.png", noise_png(2), "image/png")]
    result = client.images.edit(model=GUARDED, prompt=CLEAN_PROMPT, image=clean, **QUICK)
    assert len(result.data) == 1


def test_an_async_job_with_a_denied_prompt_is_refused_at_submission(base_url, guarded):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ALICE}"}) as http:
        answer = http.post(
            "/v1/images/generations",
            json={"model": GUARDED, "prompt": DENIED, **QUICK},
            headers=ASYNC,
            timeout=60,
        )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == ("moderation_blocked", "image_generation_user_error")


def test_moderation_low_is_for_the_keys_the_operator_names(base_url, guarded):
    """alice may send `low`, bob may not (a 400 naming `moderation`, not a silent `auto`); an
    invalid value is a 400 for anyone. `low` does not relax the deny list here."""
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base_url, BOB).images.generate(
            model=GUARDED, prompt=CLEAN_PROMPT, moderation="low", **QUICK
        )
    assert info.value.param == "moderation" and info.value.code == "moderation_low_forbidden"
    with pytest.raises(openai.BadRequestError) as info:
        sdk(base_url).images.generate(
            model=GUARDED, prompt=CLEAN_PROMPT, extra_body={"moderation": "off"}, **QUICK
        )
    assert info.value.param == "moderation"
    result = sdk(base_url).images.generate(
        model=GUARDED, prompt=CLEAN_PROMPT, moderation="low", **QUICK
    )
    assert len(result.data) == 1
    blocked(lambda: sdk(base_url).images.generate(model=GUARDED, prompt=DENIED, moderation="low"))


def test_every_format_is_marked_and_signed(base_url, guarded, tmp_path):
    """exiftool reads the IPTC source type and Software; the C2PA manifest validates against
    the test CA with the action and source type as written; a changed byte fails validation."""
    client = sdk(base_url)
    for fmt in ("png", "jpeg", "webp"):
        data = client.images.generate(
            model=GUARDED, prompt=CLEAN_PROMPT, output_format=fmt, extra_body={"seed": 4}, **QUICK
        ).data[0]
        image = base64.b64decode(data.b64_json)
        marks = exif_marks(image, tmp_path, fmt)
        assert marks["DigitalSourceType"] == TRAINED, marks
        # exiftool 12.57 misreads the eXIf chunk of a PNG that also holds a C2PA box (it warns
        # "IFD0 pointer references previous JUMBFBox directory"); Pillow reads it.
        software = marks.get("Software") or Image.open(io.BytesIO(image)).getexif()[0x0131]
        assert GUARDED in software, marks
        store = read_c2pa(image, fmt, guarded["root_pem"])
        assert store["validation_state"] == "Trusted", store.get("validation_results")
        manifest = store["manifests"][store["active_manifest"]]
        actions = c2pa_actions(manifest)
        assert actions[0]["action"] == "c2pa.created"
        assert actions[0]["digitalSourceType"] == TRAINED
        tampered = bytearray(image)
        tampered[len(tampered) // 2] ^= 0xFF
        assert read_c2pa(bytes(tampered), fmt, guarded["root_pem"])["validation_state"] != (
            "Trusted"
        )


def test_a_masked_edit_is_marked_as_a_composite_and_edited(base_url, guarded, tmp_path):
    from tests.integration.test_edits import center_mask

    client = sdk(base_url)
    result = client.images.edit(
        model=GUARDED,
        prompt=CLEAN_PROMPT,
        image=("in.png", noise_png(3), "image/png"),
        mask=("mask.png", center_mask(64, 64)[0], "image/png"),
        **QUICK,
    )
    image = base64.b64decode(result.data[0].b64_json)
    assert exif_marks(image, tmp_path, "png")["DigitalSourceType"] == COMPOSITE
    store = read_c2pa(image, "png", guarded["root_pem"])
    manifest = store["manifests"][store["active_manifest"]]
    actions = c2pa_actions(manifest)
    # C2PA's first action must be `created` or `opened`: the input is opened, then edited
    assert [action["action"] for action in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[-1]["digitalSourceType"] == COMPOSITE
    assert manifest.get("ingredients"), "the edit's input is its ingredient"


def test_the_default_model_marks_b64_url_and_job_images(base_url, guarded, tmp_path):
    """No moderation and no C2PA by default, but every returned or stored image is marked."""
    client = sdk(base_url)
    http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ALICE}"})
    for fmt in ("png", "jpeg", "webp"):
        data = client.images.generate(prompt="a fox", output_format=fmt, **QUICK).data[0]
        marks = exif_marks(base64.b64decode(data.b64_json), tmp_path, fmt)
        assert marks["DigitalSourceType"] == TRAINED and "flux-kontext-tiny" in marks["Software"]
    url = client.images.generate(prompt="a fox", response_format="url", **QUICK).data[0].url
    stored = httpx.get(url, timeout=60).content
    assert exif_marks(stored, tmp_path, "png")["DigitalSourceType"] == TRAINED
    answer = http.post("/v1/images/generations", json={"prompt": "a fox", **QUICK}, headers=ASYNC)
    assert answer.status_code == 202, answer.text
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/images/jobs/{answer.json()['id']}").json())["status"] != (
        "completed"
    ):
        assert job["status"] in ("queued", "in_progress") and time.monotonic() < deadline, job
        time.sleep(0.2)
    image = base64.b64decode(job["result"]["data"][0]["b64_json"])
    assert exif_marks(image, tmp_path, "png")["DigitalSourceType"] == TRAINED


def test_refusals_are_counted_by_check_and_model_and_prompts_never_logged(
    base_url, guarded, metrics_port
):
    from tests.integration.test_secrets import session_files

    def refusals(check: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ray_serve_app_moderation_refusals_total{")
            and f'model="{GUARDED}"' in line
            and f'check="{check}"' in line
        )

    blocked(lambda: sdk(base_url).images.generate(model=GUARDED, prompt=DENIED, **QUICK))
    deadline = time.monotonic() + 30
    while refusals("blocked_terms") < 1 or refusals("input_image") < 1:
        assert time.monotonic() < deadline, "refusals not exported"
        time.sleep(1)
    assert refusals("text_classifier") >= 1
    time.sleep(2)  # log lines reach their files
    for path in session_files():
        if path.suffix in (".log", ".out", ".err"):
            assert b"zebraquokka" not in path.read_bytes(), f"a prompt is in {path}"
