"""The moderation classifiers: transformers' own `pipeline`s (image-classification,
text-classification) from a hub id or a local directory, as `moderation.Classify` callables.

Loaded once per model replica, on the model's device unless `safety.device` says otherwise; a
flagged label the classifier does not have is a load error (a typo would otherwise pass
everything). All labels' scores come back (`top_k=None`), one batched call per list of inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.config import ClassifierCheck, ModelConfig
from serve_app.moderation import Classify, Moderation, Scores


def classifier_device(config: ModelConfig, engine_device: str) -> str:
    device = config.safety.device
    return engine_device if device == "auto" else device


def load_classifier(check: ClassifierCheck, task: str, device: str) -> Classify:
    """A transformers pipeline for `task` as a callable over a list of inputs."""
    from transformers import pipeline

    make: Any = pipeline  # the task is a variable: no overload of `pipeline` applies
    classifier = make(task, model=check.source, device=device)
    labels = set(classifier.model.config.id2label.values())
    missing = sorted(set(check.flagged_labels) - labels)
    if missing:
        raise ValueError(
            f"safety: classifier {check.source!r} has no label {', '.join(map(repr, missing))} "
            f"(its labels: {', '.join(sorted(labels))})"
        )
    classifier.model.eval()

    def classify(inputs: Sequence[Any]) -> Scores:
        items = list(inputs)
        results = classifier(items, top_k=None, batch_size=len(items))
        if items and isinstance(results[0], dict):  # one input answers one list, not a list
            results = [results]
        return [{entry["label"]: float(entry["score"]) for entry in result} for result in results]

    return classify


def load_moderation(config: ModelConfig, engine_device: str) -> Moderation | None:
    """The model's checks with their classifiers loaded; None when moderation is off."""
    safety = config.safety
    if not safety.enabled:
        return None
    device = classifier_device(config, engine_device)
    text = image = None
    if safety.text_classifier is not None:
        text = load_classifier(safety.text_classifier, "text-classification", device)
    if safety.image_classifier is not None and (
        safety.check_input_images or safety.check_output_images
    ):
        image = load_classifier(safety.image_classifier, "image-classification", device)
    return Moderation(safety, text, image)
