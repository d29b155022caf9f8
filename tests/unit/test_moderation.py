"""Moderation: the policy (terms, thresholds, `low`), the tiny classifiers through the real
transformers loader, and the model replica's checks (prompt, inputs, outputs, previews)."""

import asyncio

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from serve_app.classifiers import load_classifier
from serve_app.config import AuthConfig, ClassifierCheck, SafetyConfig
from serve_app.contract import APIError, ModelRequest, PreviewImages
from serve_app.engine import ImageEngine
from serve_app.model import ImageModel
from serve_app.moderation import Moderation, check_moderation_value, refusal, thumbnails
from tests.conftest import make_job
from tests.moderation_models import CLEAN_PROMPT, FLAGGED_PROMPT, red_image
from tests.unit.conftest import Recorder

RED_SEED = 2  # the engine below turns this seed's output red


def noise(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_check(models, **fields) -> ClassifierCheck:
    return ClassifierCheck(
        **{"source": models["image"], "flagged_labels": ["nsfw"], "threshold": 0.5, **fields}
    )


def text_check(models, **fields) -> ClassifierCheck:
    values = {
        "source": models["text"],
        "flagged_labels": [models["text_label"]],
        "threshold": float(models["text_threshold"]),
    }
    return ClassifierCheck(**{**values, **fields})


# --- policy -----------------------------------------------------------------------------------


def test_the_refusal_is_openais_shape_and_names_only_the_check():
    error = refusal("input image 2")
    assert (error.status, error.code, error.type) == (
        400,
        "moderation_blocked",
        "image_generation_user_error",
    )
    assert "input image 2" in error.message


def test_blocked_terms_match_whole_words_in_any_case_and_spacing():
    moderation = Moderation(
        SafetyConfig(enabled=True, blocked_terms=["forbidden fruit", "gore"],
                     blocked_patterns=[r"\bk[i1]ll\b"])
    )  # fmt: skip
    refused = moderation.check_prompt("A FORBIDDEN   Fruit on a table", low=False)
    assert refused is not None and refused.check == "blocked_terms"
    assert "FORBIDDEN" not in refused.error().message  # the content is never echoed
    assert moderation.check_prompt("Gore!", low=False) is not None
    assert moderation.check_prompt("a k1ll screen", low=False) is not None
    # what looks the same to a reader (or a tokenizer) is the same to the check
    disguises = [
        "Ｇｏｒｅ", "go\u200bre", "GO\u00adRE", "go\ufe0fre", "go\u034fre", "go\u115fre",
        "go\u0301re", "góre", "gore_scene", "forbidden\u00a0fruit", "forbidden-fruit",
        "forbidden_fruit", "forbiddenfruit", "forbidden\u200bfruit",
    ]  # fmt: skip
    for disguised in disguises:
        assert moderation.check_prompt(disguised, low=False) is not None, ascii(disguised)
    for clean in ("forbidden", "a gorgeous view", "skill", "fruit", "a  cat.", "gores"):
        assert moderation.check_prompt(clean, low=False) is None, clean


def test_operator_patterns_each_keep_their_own_flags_and_groups():
    patterns = [r"(?x) s  e  c  r  e  t", r"(a)\1", r"(b)\1", r"(?P<w>x)y", r"(?P<w>z)q"]
    moderation = Moderation(SafetyConfig(enabled=True, blocked_patterns=patterns))
    for prompt in ("SECRET", "aa", "bb", "xy", "zq"):
        assert moderation.check_prompt(prompt, low=False) is not None, prompt
    assert moderation.check_prompt("ab xz", low=False) is None


def test_configs_that_would_check_nothing_or_everything_are_refused():
    with pytest.raises(ValidationError, match="no visible characters"):
        SafetyConfig(enabled=True, blocked_terms=["\u200b"])
    with pytest.raises(ValidationError, match="nothing to check"):
        SafetyConfig(enabled=True)
    with pytest.raises(ValidationError, match="no keys are configured"):
        AuthConfig(moderation_low_keys=["alice"])


def test_low_keys_must_name_configured_keys(tmp_path):
    from serve_app.auth import KeyStore

    keys = tmp_path / "keys.yaml"
    keys.write_text("alice: sk-alice-1234567890\nbob: sk-bob-1234567890\n")
    KeyStore.from_config(AuthConfig(api_keys_file=str(keys), moderation_low_keys=["alice"]))
    with pytest.raises(ValueError, match="no API key is named 'alcie'"):
        KeyStore.from_config(AuthConfig(api_keys_file=str(keys), moderation_low_keys=["alcie"]))


def test_low_relaxes_only_what_the_config_says():
    terms = ["gore"]
    strict = Moderation(SafetyConfig(enabled=True, blocked_terms=terms))
    relaxed = Moderation(SafetyConfig(enabled=True, blocked_terms=terms, terms_under_low=False))
    assert strict.check_prompt("gore", low=True) is not None
    assert relaxed.check_prompt("gore", low=True) is None
    assert relaxed.check_prompt("gore", low=False) is not None

    check = ClassifierCheck(source="x", flagged_labels=["nsfw"], threshold=0.5, low_threshold=0.9)
    scores = {"nsfw": 0.7}
    moderation = Moderation(
        SafetyConfig(enabled=True, image_classifier=check), image_classifier=lambda xs: [scores]
    )
    assert moderation.check_outputs(["image"], low=False, total=1) is not None
    assert moderation.check_outputs(["image"], low=True, total=1) is None
    unrelaxed = check.model_copy(update={"low_threshold": None})
    assert unrelaxed.threshold_for(True) == 0.5
    with pytest.raises(ValidationError, match="may only relax"):
        ClassifierCheck(source="x", flagged_labels=["nsfw"], threshold=0.5, low_threshold=0.4)


def test_the_moderation_field_and_who_may_send_low():
    assert check_moderation_value(None, True, "") == "auto"
    assert check_moderation_value("low", True, "") == "low"
    invalid = pytest.raises(APIError)
    with invalid as info:
        check_moderation_value("off", True, "")
    assert info.value.param == "moderation"
    with pytest.raises(APIError) as info:
        check_moderation_value("low", False, "for this API key")
    assert info.value.code == "moderation_low_forbidden" and "API key" in info.value.message
    assert check_moderation_value("auto", False, "") == "auto"


def test_a_bad_pattern_or_an_unknown_label_is_a_config_error(moderation_models):
    with pytest.raises(ValidationError, match="not a valid regex"):
        SafetyConfig(blocked_patterns=["(unclosed"])
    with pytest.raises(ValueError, match="has no label 'porn'"):
        load_classifier(
            image_check(moderation_models, flagged_labels=["porn"]), "image-classification", "cpu"
        )


def test_thumbnails_bound_what_travels_for_the_input_check():
    small = thumbnails([Image.new("RGBA", (2000, 1000)), Image.new("L", (40, 30))], side=512)
    assert [image.size for image in small] == [(512, 256), (40, 30)]
    assert {image.mode for image in small} == {"RGB"}


# --- the tiny classifiers, through the same loader as a hub one ----------------------------------


def test_the_tiny_image_classifier_flags_red_and_passes_noise(moderation_models):
    classify = load_classifier(image_check(moderation_models), "image-classification", "cpu")
    scores = classify([red_image(), noise(1), Image.new("RGB", (64, 64), "white"), noise(2)])
    assert [round(s["nsfw"]) for s in scores] == [1, 0, 0, 0]
    assert classify([red_image((48, 80))])[0]["nsfw"] > 0.99  # any size, one input


def test_the_tiny_text_classifier_splits_the_chosen_prompts(moderation_models):
    check = text_check(moderation_models)
    moderation = Moderation(
        SafetyConfig(enabled=True, text_classifier=check),
        text_classifier=load_classifier(check, "text-classification", "cpu"),
    )
    refused = moderation.check_prompt(FLAGGED_PROMPT, low=False)
    assert refused is not None and refused.check == "text_classifier"
    assert moderation.check_prompt(CLEAN_PROMPT, low=False) is None


def test_a_prompt_longer_than_the_text_classifier_reads_is_checked_in_windows(moderation_models):
    """Past the tiny BERT's 64 positions: no crash (it was a 500), and every token is in some
    window, the tail included."""
    from transformers import AutoTokenizer

    from serve_app.classifiers import split_text

    check = text_check(moderation_models)
    classify = load_classifier(check, "text-classification", "cpu")
    long_prompt = "a calm lake at dawn " * 40 + FLAGGED_PROMPT
    [scores] = classify([long_prompt])
    assert set(scores) == {"safe", "unsafe"}
    tokenizer = AutoTokenizer.from_pretrained(moderation_models["text"])
    pieces = split_text(tokenizer, long_prompt, 20)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    assert len(pieces) > 1 and all(len(i) <= 20 for i in ids)
    assert pieces[-1].endswith(FLAGGED_PROMPT)
    whole = tokenizer(long_prompt, add_special_tokens=False)["input_ids"]
    assert sum(len(i) for i in ids[::2]) >= len(whole) - 20  # windows overlap by half


# --- in the model replica ----------------------------------------------------------------------


class RedForOneSeed(ImageEngine):
    """The real tiny engine, except that seed RED_SEED's image comes out red."""

    def generate(self, jobs, step_callback=None):
        outputs = super().generate(jobs, step_callback)
        for job, images in zip(jobs, outputs, strict=True):
            for k, seed in enumerate(job.seeds):
                if seed == RED_SEED:
                    images[k] = red_image(images[k].size)
        return outputs


@pytest.fixture(scope="module")
def model(tiny_cache_dir, moderation_models):
    config = {
        "id": "tiny",
        "source": "tiny",
        "cache_dir": tiny_cache_dir,
        "warmup": False,
        "safety": {
            "enabled": True,
            "blocked_terms": ["gore"],
            "text_classifier": text_check(moderation_models).model_dump(),
            "image_classifier": image_check(moderation_models, low_threshold=1.0).model_dump(),
        },
    }
    replica = ImageModel(config, engine_cls=RedForOneSeed)
    replica.metrics.moderation_refusals = Recorder()
    return replica


def refused(coroutine) -> APIError:
    with pytest.raises(APIError) as info:
        asyncio.run(coroutine)
    assert info.value.code == "moderation_blocked"
    return info.value


def test_the_replica_refuses_a_prompt_before_it_joins_a_call(model):
    model.metrics.moderation_refusals.calls.clear()
    assert "blocked terms" in refused(model.generate(make_job(prompt="some gore"))).message
    assert "text classifier" in refused(model.generate(make_job(prompt=FLAGGED_PROMPT))).message
    # a stream is refused before its first event, so the client gets a plain 400
    stream = model.generate_stream(make_job(prompt="gore", preview_steps=(0,)))
    refused(stream.__anext__())
    checks = [tags["check"] for _, tags in model.metrics.moderation_refusals.calls]
    assert checks == ["blocked_terms", "text_classifier", "blocked_terms"]
    result = asyncio.run(model.generate(make_job(prompt=CLEAN_PROMPT, seeds=(1, 3))))
    assert len(result.images) == 2


def test_the_replica_refuses_a_flagged_input_image_naming_it(model):
    request = make_job(prompt=CLEAN_PROMPT, moderation_inputs=(noise(5), red_image()))
    assert "input image 2" in refused(model.check_request(request)).message
    ok = make_job(prompt=CLEAN_PROMPT, moderation_inputs=(noise(5), noise(6)))
    assert asyncio.run(model.check_request(ok)) > 0


def test_one_flagged_output_refuses_the_whole_request_and_low_relaxes_it(model):
    """n=3 with the middle image flagged: no image comes back, the message names image 2 of 3;
    under `moderation: low` (low_threshold 1.0 here) all three come back."""
    request = make_job(prompt=CLEAN_PROMPT, seeds=(1, RED_SEED, 3))
    error = refused(model.generate(request))
    assert "output image 2 of 3" in error.message
    model.reconfigure({"max_batch_images": 1})  # split into chunks: numbering is the request's
    try:
        assert "output image 2 of 3" in refused(model.generate(request)).message
    finally:
        model.reconfigure({})
    low = asyncio.run(model.generate(ModelRequest(**{**request.__dict__, "moderation": "low"})))
    assert len(low.images) == 3


def test_a_request_without_its_inputs_copies_has_its_canvas_checked(model):
    """An input check never passes for want of copies (an older ingress, an old queued job)."""
    request = make_job(prompt=CLEAN_PROMPT, conditioning=(red_image(),))
    assert "input image 1" in refused(model.check_request(request)).message
    assert asyncio.run(model.check_request(make_job(prompt=CLEAN_PROMPT, conditioning=(noise(3),))))


def test_previews_carry_the_marks_too(model):
    request = make_job(prompt=CLEAN_PROMPT, seeds=(7,))
    [event] = asyncio.run(model._stream_events(request, PreviewImages(0, 0, 0, [noise(1)])))
    assert b"trainedAlgorithmicMedia" in event.image


def test_a_signing_failure_is_a_503_and_returns_nothing_unsigned(model, monkeypatch):
    class BrokenSigner:
        def sign(self, *args):
            raise RuntimeError("time-stamp authority unreachable")

    monkeypatch.setattr(model.marks, "signer", BrokenSigner())
    with pytest.raises(APIError) as info:
        asyncio.run(model.generate(make_job(prompt=CLEAN_PROMPT)))
    assert (info.value.status, info.value.code) == (503, "provenance_unavailable")


def test_a_flagged_preview_is_never_sent(model):
    request = make_job(prompt=CLEAN_PROMPT, seeds=(7, 8))
    previews = PreviewImages(partial_index=0, step=0, first_image_index=0,
                             images=[noise(1), red_image()])  # fmt: skip
    error = refused(model._stream_events(request, previews))
    assert "preview of output image 2 of 2" in error.message
    clean = PreviewImages(0, 0, 0, [noise(1), noise(2)])
    events = asyncio.run(model._stream_events(request, clean))
    assert [event.image_index for event in events] == [0, 1]


def test_resolution_reads_moderation_and_says_who_forbids_low():
    from serve_app.config import ModelConfig
    from serve_app.protocol import ImageGenerationRequest
    from serve_app.resolution import resolve_generation

    strict = ModelConfig(
        id="m", source="tiny", safety={"enabled": True, "blocked_terms": ["x"], "allow_low": False}
    )
    models = {"m": strict}
    low = ImageGenerationRequest(prompt="a cat", moderation="low")
    with pytest.raises(APIError) as info:
        resolve_generation(low, models, 4)
    assert info.value.param == "moderation" and "'m'" in info.value.message
    open_model = {"m": ModelConfig(id="m", source="tiny")}
    assert resolve_generation(low, open_model, 4).moderation == "low"
    with pytest.raises(APIError) as info:
        resolve_generation(low, open_model, 4, key_allows_low=False)
    assert "API key" in info.value.message
    request = resolve_generation(ImageGenerationRequest(prompt="a cat"), open_model, 4)
    assert request.moderation == "auto"
    assert request.to_model_request("r").moderation == "auto"


def test_a_refusal_mid_stream_is_an_error_event_the_sdk_raises_with_its_code(app, fake):
    """A preview or output refused after the stream started: `event: error` with the same
    object as the 400 (through the stock SDK over the ingress, the model faked)."""
    import openai

    fake.fail_mid_stream = refusal("preview of output image 1 of 1")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=app)
    stream = client.images.generate(
        prompt="a cat", size="64x64", stream=True, partial_images=1, extra_body={"seed": 1}
    )
    seen = []
    with pytest.raises(openai.APIError) as info:
        for event in stream:
            seen.append(event.type)
    assert seen == ["image_generation.partial_image"]  # the preview before the refused one
    assert info.value.code == "moderation_blocked"
    assert info.value.type == "image_generation_user_error"
    assert "preview of output image 1 of 1" in info.value.message
