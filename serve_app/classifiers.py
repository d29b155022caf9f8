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

    if task != "text-classification":
        return classify
    window = text_window(classifier)

    def classify_texts(texts: Sequence[Any]) -> Scores:
        """A text longer than the classifier reads is classified in overlapping windows; each
        label scores its highest over them (truncating would leave the tail unchecked)."""
        spans = [split_text(classifier.tokenizer, str(text), window) for text in texts]
        scores = classify([piece for pieces in spans for piece in pieces])
        out, start = [], 0
        for pieces in spans:
            part = scores[start : start + len(pieces)]
            start += len(pieces)
            out.append({label: max(s.get(label, 0.0) for s in part) for label in part[0]})
        return out

    return classify_texts


def text_window(classifier: Any) -> int:
    """Tokens of one window: what the model reads at once, less its special tokens."""
    tokenizer, config = classifier.tokenizer, classifier.model.config
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    usable = min(int(limit) for limit in limits if limit and limit < 1_000_000)
    return max(8, usable - tokenizer.num_special_tokens_to_add())


def split_text(tokenizer: Any, text: str, window: int) -> list[str]:
    """`text` as overlapping pieces of at most `window` tokens (half a window of overlap, so a
    phrase cut by one boundary lies whole in the next piece)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= window:
        return [text]
    step = window // 2
    return [
        tokenizer.decode(ids[start : start + window])
        for start in range(0, max(1, len(ids) - step), step)
    ]


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
