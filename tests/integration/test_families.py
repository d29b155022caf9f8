"""Several model families behind one app, through the stock SDK: the session's FLUX.1 Kontext
model, a FLUX.1 [dev] model (family `flux`), a FLUX.2 [klein] model (`flux2-klein`) and a
Qwen-Image model (`qwen-image`) and a Qwen-Image-Edit model (`qwen-image-edit`: edits and
variations only), each its own tiny model and its own deployment with its own
autoscaling. Every endpoint of each family,
what a family cannot do refused naming the parameter, streams with previews, and `/v1/models`
saying what each model serves.
"""

import copy
import io
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import decode_base64_image, pixels
from tests.integration.conftest import APP_NAME, BATCH_WAIT_S
from tests.integration.test_edits import center_mask

FLUX = "flux-dev-tiny"
FLUX_DEPLOYMENT = "ImageModel-" + FLUX
KLEIN = "flux2-klein-tiny"
QWEN = "qwen-image-tiny"
QWEN_EDIT = "qwen-image-edit-tiny"
KONTEXT = "flux-kontext-tiny"


@pytest.fixture(scope="module")
def two_families(base_url, serve_config, redeploy, tmp_path_factory):
    """The session app serving a `flux` model too (restored afterwards); the new deployment
    keeps two replicas while the Kontext one keeps its own autoscaling."""
    config = copy.deepcopy(serve_config)
    [app] = config["applications"]
    app["args"]["models"].append(
        {
            "id": FLUX,
            "family": "flux",
            "source": "tiny",
            "cache_dir": str(tmp_path_factory.mktemp("flux-tiny")),
        }
    )
    app["args"]["models"].append(
        {
            "id": KLEIN,
            "family": "flux2-klein",
            "source": "tiny",
            "cache_dir": str(tmp_path_factory.mktemp("klein-tiny")),
        }
    )
    app["args"]["models"].append(
        {
            "id": QWEN,
            "family": "qwen-image",
            "source": "tiny",
            "cache_dir": str(tmp_path_factory.mktemp("qwen-tiny")),
        }
    )
    app["args"]["models"].append(
        {
            "id": QWEN_EDIT,
            "family": "qwen-image-edit",
            "source": "tiny",
            "cache_dir": str(tmp_path_factory.mktemp("qwen-edit-tiny")),
        }
    )
    app["deployments"].append(
        {
            "name": "ImageModel-" + QWEN_EDIT,
            "ray_actor_options": {"num_cpus": 0.01},
            "user_config": {"max_batch_images": 8, "batch_wait_timeout_s": BATCH_WAIT_S},
        }
    )
    app["deployments"].append(
        {
            "name": "ImageModel-" + QWEN,
            "ray_actor_options": {"num_cpus": 0.01},
            "user_config": {"max_batch_images": 8, "batch_wait_timeout_s": BATCH_WAIT_S},
        }
    )
    app["deployments"].append(
        {
            "name": "ImageModel-" + KLEIN,
            "ray_actor_options": {"num_cpus": 0.01},
            "user_config": {"max_batch_images": 8, "batch_wait_timeout_s": BATCH_WAIT_S},
        }
    )
    app["deployments"].append(
        {
            "name": FLUX_DEPLOYMENT,
            "ray_actor_options": {"num_cpus": 0.01},
            "autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
            "user_config": {"max_batch_images": 8, "batch_wait_timeout_s": BATCH_WAIT_S},
        }
    )
    loras = family_loras(tmp_path_factory.mktemp("family-loras"))
    for model in app["args"]["models"]:
        if model["id"] in loras:
            model["lora"] = {"dirs": [str(loras[model["id"]])]}
    redeploy(config, timeout_s=720)  # six model replicas start at once on two cores
    try:
        yield config
    finally:
        redeploy(serve_config)


def family_loras(root) -> dict:
    """A LoRA built with peft for each family's tiny transformer (`style`), and beside it one
    built for another family (`alien`), in a directory per model."""
    from diffusers import Flux2KleinPipeline, FluxPipeline, QwenImagePipeline

    from serve_app.families.flux2_klein_build import build_tiny_pipeline as klein_tiny
    from serve_app.families.qwen_image_build import build_tiny_pipeline as qwen_tiny
    from serve_app.tiny import build_tiny_pipeline as kontext_tiny
    from tests.unit.test_model_families import save_peft_lora

    builds = {
        "flux": (lambda: kontext_tiny().transformer, FluxPipeline),  # FLUX.1's layers
        "klein": (lambda: klein_tiny().transformer, Flux2KleinPipeline),
        "qwen": (lambda: qwen_tiny().transformer, QwenImagePipeline),
    }
    files = {}
    for family, (transformer, pipeline) in builds.items():
        files[family] = save_peft_lora(transformer(), pipeline, root / family)
    owners = {FLUX: ("flux", "qwen"), KLEIN: ("klein", "flux"), QWEN: ("qwen", "flux"),
              QWEN_EDIT: ("qwen", "flux")}  # fmt: skip
    folders = {}
    for model, (own, other) in owners.items():
        folder = root / model
        folder.mkdir()
        (folder / "style.safetensors").write_bytes(Path(files[own]).read_bytes())
        (folder / "alien.safetensors").write_bytes(Path(files[other]).read_bytes())
        folders[model] = folder
    return folders


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def halves(left: str, right: str, size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def test_models_list_each_family_with_what_it_serves(two_families, http):
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    assert cards[FLUX]["family"] == "flux" and cards[KONTEXT]["family"] == "flux-kontext"
    assert cards[KLEIN]["family"] == "flux2-klein" and cards[QWEN]["family"] == "qwen-image"
    assert cards[KLEIN]["limits"]["quality_steps"] == {"low": 2, "medium": 4, "high": 8}
    for model in (FLUX, KONTEXT, KLEIN, QWEN):
        assert cards[model]["endpoints"] == ["generations", "edits", "variations"]
    assert cards[QWEN_EDIT]["family"] == "qwen-image-edit"
    assert cards[QWEN_EDIT]["endpoints"] == ["edits", "variations"]
    assert cards[QWEN_EDIT]["limits"]["masked_edits"] is False
    assert cards[FLUX]["limits"]["multi_image_edits"] is False
    assert cards[KONTEXT]["limits"]["multi_image_edits"] is True
    assert http.get(f"/v1/models/{FLUX}").json()["family"] == "flux"


def test_each_family_is_its_own_deployment_with_its_own_replicas(two_families):
    from ray import serve

    deployments = serve.status().applications[APP_NAME].deployments
    running = {name: sum(info.replica_states.values()) for name, info in deployments.items()}
    assert running[FLUX_DEPLOYMENT] == 2
    assert running["ImageModel-" + KONTEXT] >= 1


def test_flux_generations_seeded_and_repeatable(two_families, client):
    def generate(**extra):
        return client.images.generate(
            model=FLUX, prompt="a lighthouse", n=2, size="64x64",
            extra_body={"seed": 7, "num_inference_steps": 3, **extra},
        )  # fmt: skip

    first, again = generate(), generate()
    images = [pixels(item.b64_json) for item in first.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert (images[0] != images[1]).mean() > 0.2  # seeds 7 and 8
    assert [item.b64_json for item in first.data] == [item.b64_json for item in again.data]
    assert (pixels(generate(seed=9).data[0].b64_json) != images[0]).mean() > 0.2
    kontext = client.images.generate(
        model=KONTEXT, prompt="a lighthouse", size="64x64",
        extra_body={"seed": 7, "num_inference_steps": 3},
    )  # fmt: skip
    assert (pixels(kontext.data[0].b64_json) != images[0]).mean() > 0.2  # another model


def test_flux_edits_and_variations_condition_on_the_image(two_families, client):
    def edit(image, **fields):
        return client.images.edit(
            model=FLUX, image=("in.png", png(image)), prompt="make it blue", size="64x64",
            extra_body={"seed": 3, "num_inference_steps": 4}, **fields,
        )  # fmt: skip

    red_blue = pixels(edit(halves("red", "blue")).data[0].b64_json)
    white = pixels(edit(Image.new("RGB", (64, 64), "white")).data[0].b64_json)
    assert red_blue.shape == (64, 64, 3) and (red_blue != white).mean() > 0.2
    variation = client.images.create_variation(
        model=FLUX, image=("in.png", png(halves("red", "blue"))), size="64x64", n=2
    )
    assert [decode_base64_image(item.b64_json).size for item in variation.data] == [(64, 64)] * 2


def test_flux_masked_edit_keeps_the_unmasked_pixels(two_families, client):
    source = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    )
    mask, editable = center_mask()
    answer = client.images.edit(
        model=FLUX, image=("in.png", png(source)), mask=("mask.png", mask), prompt="a hole",
        extra_body={"seed": 1, "num_inference_steps": 3},
    )  # fmt: skip
    out, original = pixels(answer.data[0].b64_json), np.asarray(source).astype(np.int16)
    assert out.shape == original.shape
    assert np.array_equal(out[~editable], original[~editable])
    assert (out[editable] != original[editable]).mean() > 0.5


def test_flux_refuses_two_input_images_naming_image(two_families, client):
    images = [("a.png", png(halves("red", "blue"))), ("b.png", png(halves("white", "black")))]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model=FLUX, image=images, prompt="merge them", size="64x64")
    error = refused.value.body
    assert error["param"] == "image" and FLUX in error["message"]
    kontext = client.images.edit(model=KONTEXT, image=images, prompt="merge", size="64x64")
    assert len(kontext.data) == 1  # Kontext places both on one canvas


def test_flux_streams_previews_then_images(two_families, client):
    events = list(
        client.images.edit(
            model=FLUX, image=("in.png", png(halves("red", "blue"))), prompt="blue",
            size="64x64", stream=True, partial_images=2,
            extra_body={"seed": 2, "num_inference_steps": 6},
        )
    )  # fmt: skip
    partials = [e for e in events if e.type == "image_edit.partial_image"]
    completed = [e for e in events if e.type == "image_edit.completed"]
    assert [p.partial_image_index for p in partials] == [0, 1] and len(completed) == 1
    assert decode_base64_image(partials[0].b64_json).size == (64, 64)


def test_klein_generates_edits_and_streams(two_families, client):
    def generate(**extra):
        return client.images.generate(
            model=KLEIN, prompt="a lighthouse", n=2, size="64x64",
            extra_body={"seed": 4, "num_inference_steps": 3, **extra},
        )  # fmt: skip

    first = generate()
    images = [pixels(item.b64_json) for item in first.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert (images[0] != images[1]).mean() > 0.2
    assert [item.b64_json for item in generate().data] == [item.b64_json for item in first.data]
    edited = client.images.edit(
        model=KLEIN, image=("in.png", png(halves("red", "blue"))), prompt="blue", size="64x64",
        extra_body={"seed": 4, "num_inference_steps": 3},
    )  # fmt: skip
    assert not np.array_equal(pixels(edited.data[0].b64_json), images[0])
    events = list(
        client.images.generate(
            model=KLEIN, prompt="a lighthouse", size="64x64", stream=True, partial_images=1,
            extra_body={"seed": 4, "num_inference_steps": 4},
        )
    )  # fmt: skip
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]


def test_klein_refuses_guidance_it_would_ignore(two_families, client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model=KLEIN, prompt="x", size="64x64", extra_body={"guidance": 3.0})
    assert refused.value.body["param"] == "guidance"


def test_qwen_generates_with_true_cfg_edits_and_streams(two_families, client):
    def generate(**extra):
        return client.images.generate(
            model=QWEN, prompt="a lighthouse", n=2, size="64x64",
            extra_body={"seed": 6, "num_inference_steps": 3, **extra},
        )  # fmt: skip

    first = generate()
    images = [pixels(item.b64_json) for item in first.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert (images[0] != images[1]).mean() > 0.2
    assert [item.b64_json for item in generate().data] == [item.b64_json for item in first.data]
    no_cfg = pixels(generate(guidance=1.0).data[0].b64_json)  # true CFG off: one pass a step
    assert (no_cfg != images[0]).mean() > 0.1
    source = Image.fromarray(
        np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    )
    mask, editable = center_mask()
    masked = client.images.edit(
        model=QWEN, image=("in.png", png(source)), mask=("mask.png", mask), prompt="a hole",
        extra_body={"seed": 1, "num_inference_steps": 3},
    )  # fmt: skip
    out, original = pixels(masked.data[0].b64_json), np.asarray(source).astype(np.int16)
    assert np.array_equal(out[~editable], original[~editable])
    events = list(
        client.images.generate(
            model=QWEN, prompt="a lighthouse", size="64x64", stream=True, partial_images=1,
            extra_body={"seed": 6, "num_inference_steps": 4},
        )
    )  # fmt: skip
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]


def test_qwen_edit_edits_variations_and_streams(two_families, client):
    def edit(image, **extra):
        return client.images.edit(
            model=QWEN_EDIT, image=("in.png", png(image)), prompt="make it blue", n=2,
            size="64x64", extra_body={"seed": 5, "num_inference_steps": 2, **extra},
        )  # fmt: skip

    first = edit(halves("red", "blue"))
    images = [pixels(item.b64_json) for item in first.data]
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert (images[0] != images[1]).mean() > 0.2  # seeds 5 and 6
    again = edit(halves("red", "blue"))
    assert [item.b64_json for item in again.data] == [item.b64_json for item in first.data]
    other = pixels(edit(Image.new("RGB", (64, 64), "white")).data[0].b64_json)
    assert (other != images[0]).mean() > 0.05  # the input image reaches the model
    two = client.images.edit(
        model=QWEN_EDIT, image=[("a.png", png(halves("red", "blue"))),
                                ("b.png", png(halves("white", "black")))],
        prompt="merge them", size="64x64", extra_body={"num_inference_steps": 2},
    )  # fmt: skip
    assert pixels(two.data[0].b64_json).shape == (64, 64, 3)  # one stitched canvas
    variation = client.images.create_variation(
        model=QWEN_EDIT, image=("in.png", png(halves("red", "blue"))), size="64x64"
    )
    assert decode_base64_image(variation.data[0].b64_json).size == (64, 64)
    events = list(
        client.images.edit(
            model=QWEN_EDIT, image=("in.png", png(halves("red", "blue"))), prompt="blue",
            size="64x64", stream=True, partial_images=1,
            extra_body={"seed": 5, "num_inference_steps": 3},
        )
    )  # fmt: skip
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decode_base64_image(events[0].b64_json).size == (64, 64)


def test_qwen_edit_refuses_generations_and_masks_naming_the_parameter(two_families, client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model=QWEN_EDIT, prompt="a lighthouse", size="64x64")
    assert refused.value.body["param"] == "model"
    assert "/v1/images/edits" in refused.value.body["message"]
    mask, _ = center_mask()
    source = Image.new("RGB", (128, 128), "red")
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(
            model=QWEN_EDIT, image=("in.png", png(source)), mask=("mask.png", mask), prompt="x"
        )
    assert refused.value.body["param"] == "mask"


def test_each_family_runs_asynchronous_jobs_equal_to_the_synchronous_answer(two_families, http):
    """The job path (queue, consumer, model client) for every family: the job's images are the
    synchronous answer's bytes."""
    from tests.integration.test_jobs import ASYNC, poll

    image = ("in.png", png(halves("red", "blue")), "image/png")
    cases = [
        (model, "/v1/images/generations", {"json": body})
        for model in (FLUX, KLEIN, QWEN)
        for body in [{"model": model, "prompt": "a fox", "size": "64x64", "seed": 2,
                      "num_inference_steps": 2}]
    ]  # fmt: skip
    form = {"model": QWEN_EDIT, "prompt": "blue", "size": "64x64", "seed": "2",
            "num_inference_steps": "2"}  # fmt: skip
    cases.append((QWEN_EDIT, "/v1/images/edits", {"data": form, "files": {"image": image}}))
    for model, path, body in cases:
        sync = http.post(path, **body)
        assert sync.status_code == 200, (model, sync.text)
        accepted = http.post(path, headers=ASYNC, **body)
        assert accepted.status_code == 202, (model, accepted.text)
        assert accepted.json()["model"] == model
        job = poll(http, accepted.json()["id"])
        assert job["status"] == "completed", (model, job)
        assert [d["b64_json"] for d in job["result"]["data"]] == [
            d["b64_json"] for d in sync.json()["data"]
        ], model


def test_the_playground_picker_offers_each_model_where_it_serves(two_families, base_url, tmp_path):
    """In Chromium: the picker names each model's family, disables a model in a mode it does not
    serve (and moves off it), says what the chosen one serves, and hides the mask painter for a
    model without masked edits; an edit sent from the page reaches Qwen-Image-Edit."""
    from playwright.sync_api import sync_playwright

    from tests.integration.test_playground import CHROMIUM, CHROMIUM_ARGS, Page, noise_png

    source = noise_png(tmp_path / "source.png")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = Page(browser, base_url)
        try:
            page.models()
            text = page.page.eval_on_selector_all(
                "#model option", "os => Object.fromEntries(os.map(o => [o.value, o.text]))"
            )
            assert text[QWEN_EDIT].startswith(f"{QWEN_EDIT} (qwen-image-edit)")
            assert text[FLUX] == f"{FLUX} (flux)"

            def disabled() -> set[str]:
                return set(
                    page.page.eval_on_selector_all(
                        "#model option", "os => os.filter(o => o.disabled).map(o => o.value)"
                    )
                )

            # generate mode: the edit-only model and its adapters (`<model>:<adapter>`)
            assert disabled() == {QWEN_EDIT, f"{QWEN_EDIT}:style", f"{QWEN_EDIT}:alien"}
            assert "not for generations" in text[QWEN_EDIT]
            page.page.check('input[name="mode"][value="edit"]')
            assert disabled() == set()
            page.page.select_option("#model", QWEN_EDIT)
            info = page.page.inner_text("#model-info")
            assert info == "qwen-image-edit: serves edits, variations; no masks"
            page.page.set_input_files("#images", str(source))
            page.page.wait_for_function("document.getElementById('images-field').hidden === false")
            time.sleep(0.5)  # the image loads; the painter would show now for a masking model
            assert not page.page.is_visible("#mask-field")
            page.page.select_option("#model", FLUX)
            page.page.locator("#mask-field").wait_for(state="visible")
            assert "one input image" in page.page.inner_text("#model-info")
            page.page.select_option("#model", QWEN_EDIT)
            assert not page.page.is_visible("#mask-field")
            page.page.fill("#prompt", "make it blue")
            page.page.select_option("#size", "custom")
            page.page.fill("#size-custom", "64x64")
            page.page.click("#submit")
            page.status("Done", timeout_s=120)
            [result] = page.gallery()
            assert result.size == (64, 64)
            page.page.check('input[name="mode"][value="generate"]')
            assert page.page.input_value("#model") != QWEN_EDIT  # moved to one that generates
            page.shot("families-picker")
        finally:
            page.close()
            browser.close()
    assert page.errors == []


@pytest.mark.parametrize("model", [FLUX, KLEIN, QWEN, QWEN_EDIT])
def test_each_family_runs_a_lora_built_for_it_and_refuses_another_familys(
    two_families, client, model
):
    """Through the SDK: `<model>:style` (a peft LoRA of the model's family) changes the image,
    the base model after it is the base image to the byte, and `alien` (another family's) is
    a 400 naming `lora`."""

    def call(name: str, **extra):
        fields = dict(
            prompt="a lighthouse", size="64x64",
            extra_body={"seed": 3, "num_inference_steps": 2, **extra},
        )  # fmt: skip
        if model == QWEN_EDIT:
            return client.images.edit(
                model=name, image=("in.png", png(halves("red", "blue"))), **fields
            )
        return client.images.generate(model=name, **fields)

    base = call(model).data[0].b64_json
    styled = call(f"{model}:style").data[0].b64_json
    assert (pixels(styled) != pixels(base)).mean() > 0.01
    assert call(model).data[0].b64_json == base
    with pytest.raises(openai.BadRequestError) as refused:
        call(model, lora=[{"name": "alien", "scale": 1.0}])
    error = refused.value.body
    assert error["param"] == "lora" and error["code"] == "adapter_wrong_family"
    assert "does not have" in error["message"]
