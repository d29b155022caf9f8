"""Model families: what each served architecture can do, and the adapter that runs it.

A family says which endpoints it serves, its size rules and defaults, and which diffusers
pipelines run each kind of call. `FamilyTraits` (this module) is pure data that the config and
the ingress read without torch; `family_runner` imports the family's engine side
(`serve_app.families.<module>`), which loads, builds and calls the pipelines. The engine keeps
one numbered path and asks the runner only what differs between families.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

Endpoint = Literal["generations", "edits", "variations"]
ENDPOINTS: tuple[Endpoint, ...] = ("generations", "edits", "variations")
FamilyName = Literal["flux-kontext", "flux", "flux2-klein", "qwen-image", "qwen-image-edit"]

# The resolutions FLUX.1 Kontext was trained on (diffusers' PREFERRED_KONTEXT_RESOLUTIONS), ~1 MP.
KONTEXT_RESOLUTIONS = [
    "672x1568", "688x1504", "720x1456", "752x1392", "800x1328", "832x1248", "880x1184",
    "944x1104", "1024x1024", "1104x944", "1184x880", "1248x832", "1328x800", "1392x752",
    "1456x720", "1504x688", "1568x672",
]  # fmt: skip

# Qwen-Image's model-card sizes (1:1, 16:9, 9:16, 4:3, 3:4, 3:2, 2:3), about 1.6 MP.
QWEN_IMAGE_RESOLUTIONS = [
    "1328x1328", "1664x928", "928x1664", "1472x1104", "1104x1472", "1584x1056", "1056x1584",
]  # fmt: skip


# Qwen-Image-Edit's input sizes: the pipeline resizes every input image to about 1 MP of its aspect
# (`calculate_dimensions(1024 * 1024, ratio)`, sides multiples of 32). These are that function's
# fixed points for Kontext's aspect ratios, so a canvas prepared at one is not resized again.
QWEN_EDIT_RESOLUTIONS = [
    "672x1568", "704x1504", "736x1440", "768x1376", "800x1312", "832x1248", "896x1184",
    "960x1120", "1024x1024", "1120x960", "1184x896", "1248x832", "1312x800", "1376x768",
    "1440x736", "1504x704", "1568x672",
]  # fmt: skip


def half_side(resolution: str) -> str:
    """A `WxH` resolution at half the side (a quarter of the pixels), sides multiples of 16."""
    width, _, height = resolution.partition("x")
    return f"{round(int(width) / 32) * 16}x{round(int(height) / 32) * 16}"


@dataclass(frozen=True)
class FamilyTraits:
    """What a family serves and its defaults; everything the ingress needs to know of it."""

    name: str
    title: str  # the checkpoints it serves, for messages and docs
    endpoints: tuple[Endpoint, ...]
    runner: str  # "module:Class" of its engine side, imported on the model replica only
    masked_edits: bool = True
    # Input images an edit may carry: one, or several (placed on one conditioning canvas).
    multi_image_edits: bool = True
    # How edits and variations condition on their input: "reference" (the model sees the image
    # beside its own tokens: an instruction-editing model) or "image_to_image" (the input is
    # re-noised by `image_strength` and denoised toward the prompt).
    conditioning: Literal["reference", "image_to_image"] = "reference"
    # The pipeline takes one set of reference images for a whole call (FLUX.2): only requests
    # with the same input images may share a call.
    references_per_call: bool = False
    # False for step-distilled models that ignore guidance: a request's `guidance` is refused.
    guidance: bool = True
    # Sequence parallelism (`parallel`) is tested for this family (diffusers has a plan for
    # every transformer here; only tested combinations are allowed); if not, why not.
    context_parallel: bool = True
    parallel_note: str = ""
    # The `speed` switches this family runs (each combination tested; others are refused).
    speed_switches: frozenset[str] = frozenset(
        {"compile", "quantization", "first_block_cache_threshold", "attention_backend"}
    )
    text_encoder: str = "T5-XXL (512 tokens)"
    max_text_tokens: int = 512
    # ModelConfig defaults for this family (explicit fields win), and what `source: tiny` adds.
    defaults: dict[str, Any] = field(default_factory=dict)
    tiny_defaults: dict[str, Any] = field(default_factory=dict)

    def serves(self, endpoint: Endpoint) -> bool:
        return endpoint in self.endpoints


_TINY_STEPS = {"quality_steps": {"low": 2, "medium": 4, "high": 8}, "default_quality": "medium"}

FAMILIES: dict[str, FamilyTraits] = {
    "flux-kontext": FamilyTraits(
        name="flux-kontext",
        title="FLUX.1 Kontext [dev]",
        endpoints=ENDPOINTS,
        runner="serve_app.families.flux:FluxKontextRunner",
        defaults={
            "quality_steps": {"low": 12, "medium": 20, "high": 28},
            "default_guidance": 2.5,
            "preferred_resolutions": KONTEXT_RESOLUTIONS,
        },
        tiny_defaults={
            **_TINY_STEPS,
            "min_side": 64,
            # Kontext's buckets at half the side (~0.25 MP): the same aspect ratios, CPU-friendly.
            "preferred_resolutions": [half_side(r) for r in KONTEXT_RESOLUTIONS],
        },
    ),
    "flux": FamilyTraits(
        name="flux",
        title="FLUX.1 [dev] / [schnell]",
        endpoints=ENDPOINTS,
        runner="serve_app.families.flux:FluxRunner",
        multi_image_edits=False,
        conditioning="image_to_image",
        defaults={
            "quality_steps": {"low": 12, "medium": 20, "high": 28},
            "default_guidance": 3.5,
            "preferred_resolutions": KONTEXT_RESOLUTIONS,
        },
        tiny_defaults={
            **_TINY_STEPS,
            "min_side": 64,
            "preferred_resolutions": [half_side(r) for r in KONTEXT_RESOLUTIONS],
        },
    ),
    "flux2-klein": FamilyTraits(
        name="flux2-klein",
        title="FLUX.2 [klein] 4B",
        endpoints=ENDPOINTS,
        runner="serve_app.families.flux2_klein:Flux2KleinRunner",
        references_per_call=True,
        guidance=False,
        # diffusers' first-block cache fails on Flux2Transformer2DModel (a TypeError in its
        # hook); fp8 is untested on this transformer.
        speed_switches=frozenset({"compile", "attention_backend"}),
        text_encoder="Qwen3-4B (512 tokens, chat template included)",
        defaults={
            # Step-distilled for 4 steps (BFL's README); more add little.
            "quality_steps": {"low": 2, "medium": 4, "high": 6},
            "default_guidance": 1.0,
            "preferred_resolutions": KONTEXT_RESOLUTIONS,  # the ~1 MP sizes of its model card
        },
        tiny_defaults={
            **_TINY_STEPS,
            "min_side": 64,
            "preferred_resolutions": [half_side(r) for r in KONTEXT_RESOLUTIONS],
        },
    ),
    "qwen-image": FamilyTraits(
        name="qwen-image",
        title="Qwen-Image",
        endpoints=ENDPOINTS,
        runner="serve_app.families.qwen_image:QwenImageRunner",
        multi_image_edits=False,
        conditioning="image_to_image",
        # Its prompts are not padded (a call's text is as long as its longest prompt), so on
        # gloo most text lengths would not split evenly, and NCCL's uneven splits are untested.
        context_parallel=False,
        parallel_note="its unpadded text sequence is untested split across GPUs",
        speed_switches=frozenset({"compile", "attention_backend"}),
        text_encoder="Qwen2.5-VL-7B (512 tokens after its template)",
        defaults={
            # The model card's 50 steps at high; true CFG 4.0 with the negative prompt " ".
            "quality_steps": {"low": 20, "medium": 30, "high": 50},
            "default_guidance": 4.0,
            "preferred_resolutions": QWEN_IMAGE_RESOLUTIONS,
        },
        tiny_defaults={
            **_TINY_STEPS,
            "min_side": 64,
            "preferred_resolutions": [half_side(r) for r in QWEN_IMAGE_RESOLUTIONS],
        },
    ),
    "qwen-image-edit": FamilyTraits(
        name="qwen-image-edit",
        title="Qwen-Image-Edit",
        # An instruction-editing model: every call conditions on an input image.
        endpoints=("edits", "variations"),
        runner="serve_app.families.qwen_image:QwenImageEditRunner",
        # diffusers' QwenImageEditInpaintPipeline generates at ~1 MP of the input's aspect
        # whatever size is asked, so a mask could not keep the unmasked pixels at the request's
        # size: masked edits are refused (qwen-image and flux-kontext take them).
        masked_edits=False,
        # Its prompts are not padded (a call's text is as long as its longest prompt), so on
        # gloo most text lengths would not split evenly, and NCCL's uneven splits are untested.
        context_parallel=False,
        parallel_note="its unpadded text sequence is untested split across GPUs",
        speed_switches=frozenset({"compile", "attention_backend"}),
        text_encoder="Qwen2.5-VL-7B (prompt tokens after its template; the input image's "
        "vision tokens come on top)",
        defaults={
            # The model card: 50 steps, true CFG 4.0 with the negative prompt " ".
            "quality_steps": {"low": 20, "medium": 30, "high": 50},
            "default_guidance": 4.0,
            "preferred_resolutions": QWEN_EDIT_RESOLUTIONS,
        },
        tiny_defaults={
            **_TINY_STEPS,
            "min_side": 64,
            "preferred_resolutions": [half_side(r) for r in QWEN_EDIT_RESOLUTIONS],
        },
    ),
}


def traits(name: str) -> FamilyTraits:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_runner(config: Any) -> Any:
    """The engine side (a `serve_app.families.base.FamilyRunner`) of a model's family, for its
    `ModelConfig`; imported here so that torch and diffusers load only where a model runs."""
    module, _, cls = traits(config.family).runner.partition(":")
    return getattr(importlib.import_module(module), cls)(config)
