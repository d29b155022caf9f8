"""Moderation: the checks a model runs on the prompt, on every input image and on every output
image before it is encoded, and what a request's `moderation: low` relaxes."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve_app.config.base import StrictModel
from serve_app.textnorm import normalized


class ClassifierCheck(StrictModel):
    """A transformers classifier (a hub id or a local directory, loaded with transformers'
    `pipeline`) and when its verdict refuses: the highest score among `flagged_labels`."""

    source: str = Field(
        min_length=1, description="Hub id or local directory of the classifier's weights."
    )
    flagged_labels: list[str] = Field(
        min_length=1,
        description="Labels that count against the content (e.g. `nsfw`); each must be one of "
        "the classifier's labels (checked at load).",
    )
    threshold: float = Field(
        gt=0,
        le=1,
        description="Refuse when a flagged label's score is at least this (0-1).",
    )
    low_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="The threshold under `moderation: low` (at least `threshold`: low only "
        "relaxes); unset: `low` does not relax this check.",
    )

    @model_validator(mode="after")
    def _low_relaxes(self) -> ClassifierCheck:
        if self.low_threshold is not None and self.low_threshold < self.threshold:
            raise ValueError(
                f"low_threshold {self.low_threshold} is below threshold {self.threshold}: "
                "moderation=low may only relax a check"
            )
        return self

    def threshold_for(self, low: bool) -> float:
        return self.low_threshold if low and self.low_threshold is not None else self.threshold


class SafetyConfig(StrictModel):
    """Moderation for one model: off unless `enabled`. A refused request is a 400 with
    `code: moderation_blocked` naming the check (docs/api.md)."""

    enabled: bool = Field(default=False, description="Run the checks below on every request.")
    blocked_terms: list[str] = Field(
        default_factory=list,
        description="Words or phrases refused in a prompt: whole words, matched after Unicode "
        "normalisation (case, accents, compatibility forms, invisible characters).",
    )
    blocked_patterns: list[str] = Field(
        default_factory=list,
        description="Regular expressions refused in a prompt (Python `re`, case-insensitive, "
        "each on its own), matched like the terms against the normalised prompt "
        "(docs/operations.md).",
    )
    terms_under_low: bool = Field(
        default=True,
        description="Whether `blocked_terms` and `blocked_patterns` also apply to requests "
        "with `moderation: low`.",
    )
    text_classifier: ClassifierCheck | None = Field(
        default=None,
        description="A text-classification model run on the prompt (and on variations' "
        "configured instruction).",
    )
    image_classifier: ClassifierCheck | None = Field(
        default=None,
        description="An image-classification model run on every input image of edits and "
        "variations and on every output image before it is encoded (and on streamed previews).",
    )
    check_input_images: bool = Field(
        default=True, description="Run `image_classifier` on input images."
    )
    check_output_images: bool = Field(
        default=True,
        description="Run `image_classifier` on output images and previews.",
    )
    allow_low: bool = Field(
        default=True,
        description="Accept `moderation: low` for this model (a request that sends it "
        "otherwise gets a 400); `auth.moderation_low_keys` can narrow it to some keys.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto",
        description="Where the classifiers run; `auto` = the model's device (they are small "
        "next to the model).",
    )

    @field_validator("blocked_terms")
    @classmethod
    def _visible_terms(cls, terms: list[str]) -> list[str]:
        empty = [term for term in terms if not normalized(term).split()]
        if empty:
            raise ValueError(
                f"blocked_terms: {', '.join(map(ascii, empty))} has no visible characters "
                "(it would match between any two words)"
            )
        return terms

    @model_validator(mode="after")
    def _something_to_check(self) -> SafetyConfig:
        if self.enabled and not (
            self.checks_prompts or self.checks_input_images or self.checks_output_images
        ):
            raise ValueError(
                "safety.enabled with nothing to check: set blocked_terms, blocked_patterns, "
                "text_classifier or image_classifier (or turn safety off)"
            )
        return self

    @field_validator("blocked_patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"blocked_patterns: {pattern!r} is not a valid regex: {exc}"
                ) from None
        return patterns

    @property
    def checks_prompts(self) -> bool:
        return self.enabled and bool(
            self.blocked_terms or self.blocked_patterns or self.text_classifier
        )

    @property
    def checks_input_images(self) -> bool:
        return self.enabled and self.check_input_images and self.image_classifier is not None

    @property
    def checks_output_images(self) -> bool:
        return self.enabled and self.check_output_images and self.image_classifier is not None
