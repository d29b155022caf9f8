"""Moderation policy: which check refuses a request, and the error OpenAI answers it with.

Pure logic over a model's `SafetyConfig` (no torch, no Ray): the prompt's blocked terms and
patterns, and the verdicts of the classifiers (`serve_app.classifiers` loads them; here they are
plain callables from inputs to label scores, so unit tests pass fakes). Every check runs in the
model replica (`ImageModel`): the prompt and the input images before a request may join a call
(so a job is refused at submission, through the same `check_request`), the output images after
decode and before encoding, and streamed previews before they are sent.

A refusal is OpenAI's: 400, `type: image_generation_user_error`, `code: moderation_blocked`; the
message names the check (prompt, input image N, output image N of n) and never echoes content.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.config import ClassifierCheck, SafetyConfig
from serve_app.contract import APIError
from serve_app.textnorm import normalized

# Input images travel to the model replica for their check downscaled to this side at most
# (classifiers look at ~224-384 pixels; a 4 MP upload would be 12 MB per check otherwise).
MODERATION_SIDE = 512
MODERATION_VALUES = ("auto", "low")

# Label scores for each input, as transformers' pipelines return them with top_k=None.
Scores = list[dict[str, float]]
Classify = Callable[[Sequence[Any]], Scores]


def refusal(check: str) -> APIError:
    """OpenAI's answer to a request its safety system refused (client code branches on the
    code); `check` says which check, never what the content was."""
    return APIError(
        f"Your request was rejected by this server's safety system ({check}). Change the "
        "request and try again.",
        status=400,
        code="moderation_blocked",
        type="image_generation_user_error",
    )


@dataclass(frozen=True)
class Refused:
    """One check's refusal: the metric's label and the message's words."""

    check: str  # metrics label: blocked_terms, text_classifier, input_image, output_image
    detail: str  # message part: "prompt: blocked terms", "input image 2", "output images 1, 3 of 4"

    def error(self) -> APIError:
        return refusal(self.detail)


# A word's edge: not a letter or digit (`_` counts as a separator, as tokenizers read it).
_START, _END = r"(?<![^\W_])", r"(?![^\W_])"


def term_regex(term: str) -> re.Pattern[str] | None:
    """A blocked term as whole words of the normalized text; between its words any run of
    separators, or none ("blood bath" also finds "blood-bath", "blood_bath", "bloodbath")."""
    words = normalized(term).split()
    if not words:
        return None
    body = r"[\W_]*".join(re.escape(word) for word in words)
    return re.compile(_START + body + _END)


def _prompt_checks(terms: Sequence[str], patterns: Sequence[str]) -> list[re.Pattern[str]]:
    """The terms as one regex (a single pass over the prompt) and each operator pattern on its
    own (joined, their flags, group names and backreferences would collide)."""
    regexes = [regex for regex in map(term_regex, terms) if regex is not None]
    checks = [re.compile("|".join(r.pattern for r in regexes))] if regexes else []
    return checks + [re.compile(pattern, re.IGNORECASE) for pattern in patterns]


def flagged_score(scores: dict[str, float], check: ClassifierCheck) -> float:
    return max((scores.get(label, 0.0) for label in check.flagged_labels), default=0.0)


def describe_outputs(indices: Sequence[int], total: int, first: int = 0) -> str:
    numbers = ", ".join(str(first + index + 1) for index in indices)
    noun = "output image" if len(indices) == 1 else "output images"
    return f"{noun} {numbers} of {total}"


class Moderation:
    """A model's checks, with the classifiers injected (callables; `classifiers.load_*` in a
    replica, fakes in unit tests). `low` is the request's `moderation: low`."""

    def __init__(
        self,
        config: SafetyConfig,
        text_classifier: Classify | None = None,
        image_classifier: Classify | None = None,
    ) -> None:
        self.config = config
        self._terms = _prompt_checks(config.blocked_terms, config.blocked_patterns)
        self._text = text_classifier if config.text_classifier else None
        self._image = image_classifier if config.image_classifier else None

    @property
    def checks_prompts(self) -> bool:
        return self.config.checks_prompts

    @property
    def checks_input_images(self) -> bool:
        return self.config.checks_input_images and self._image is not None

    @property
    def checks_output_images(self) -> bool:
        return self.config.checks_output_images and self._image is not None

    def check_prompt(self, prompt: str, low: bool) -> Refused | None:
        if self._terms and (self.config.terms_under_low or not low):
            text = normalized(prompt)
            if any(regex.search(text) for regex in self._terms):
                return Refused("blocked_terms", "prompt: blocked terms")
        check = self.config.text_classifier
        if self._text is not None and check is not None:
            (scores,) = self._text([prompt])
            if flagged_score(scores, check) >= check.threshold_for(low):
                return Refused("text_classifier", "prompt: text classifier")
        return None

    def flagged_images(self, images: Sequence[Any], low: bool) -> list[int]:
        """Indices of the images the image classifier flags (one batched classifier call)."""
        check = self.config.image_classifier
        if self._image is None or check is None or not images:
            return []
        threshold = check.threshold_for(low)
        scores = self._image(images)
        return [i for i, s in enumerate(scores) if flagged_score(s, check) >= threshold]

    def check_inputs(self, images: Sequence[Any], low: bool) -> Refused | None:
        if not self.checks_input_images:
            return None
        flagged = self.flagged_images(images, low)
        if not flagged:
            return None
        noun = "input image" if len(flagged) == 1 else "input images"
        return Refused("input_image", f"{noun} {', '.join(str(i + 1) for i in flagged)}")

    def check_outputs(
        self, images: Sequence[Any], low: bool, total: int, first: int = 0
    ) -> Refused | None:
        """Output images `first..first+len-1` of a request of `total`: any flagged refuses the
        whole request (no image is sent, stored or linked), naming each flagged one."""
        if not self.checks_output_images:
            return None
        flagged = self.flagged_images(images, low)
        if not flagged:
            return None
        return Refused("output_image", describe_outputs(flagged, total, first))


def check_moderation_value(value: str | None, allowed_low: bool, why_not: str) -> str:
    """The request's `moderation` (`auto` when absent); `low` where it is forbidden is a 400
    that says why, not a silent `auto`."""
    if value is None:
        return "auto"
    if value not in MODERATION_VALUES:
        raise APIError(
            f"Invalid moderation {value!r}: must be one of {', '.join(MODERATION_VALUES)}.",
            param="moderation",
        )
    if value == "low" and not allowed_low:
        raise APIError(
            f"moderation 'low' is not allowed {why_not}; send 'auto' or leave it out.",
            param="moderation",
            code="moderation_low_forbidden",
        )
    return value


def thumbnails(images: Sequence[Any], side: int = MODERATION_SIDE) -> tuple[Any, ...]:
    """Copies of the input images at most `side` pixels on a side, RGB, for their check."""
    out = []
    for image in images:
        small = image.convert("RGB") if image.mode != "RGB" else image.copy()
        small.thumbnail((side, side))
        out.append(small)
    return tuple(out)
