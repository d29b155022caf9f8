"""A parsed request + a model's config -> exactly the work to do, with every default applied.

`resolve_generation` checks every value against the model's bounds, failing fast with the
offending `param` named; `ResolvedGeneration.to_model_request` is the one place a request becomes
the `ModelRequest` a model replica runs. No HTTP, no torch.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve_app.adapters import check_name, not_found
from serve_app.config import ModelConfig, UploadLimits
from serve_app.contract import AdapterRef, APIError, ModelRequest
from serve_app.dataclass_json import from_jsonable, to_jsonable
from serve_app.families import Endpoint, traits
from serve_app.geometry import PATCH, format_wxh, image_tokens, nearest_resolution, parse_wxh
from serve_app.moderation import check_moderation_value
from serve_app.protocol import (
    MAX_SEED,
    SHOWN_CHARS,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOptions,
    ImageVariationRequest,
    InputTokensDetails,
    Usage,
    shown,
)

if TYPE_CHECKING:
    from serve_app.imageops import Conditioning

# OpenAI names "standard"/"hd" (dall-e-3) map onto our presets.
QUALITY_ALIASES = {"standard": "medium", "hd": "high"}
QUALITIES = ("auto", "low", "medium", "high", *QUALITY_ALIASES)
BACKGROUNDS = ("auto", "opaque", "transparent")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")


@dataclass(frozen=True)
class ResolvedGeneration:
    """What a validated request asks the model to do, with every default applied."""

    model_id: str
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    quality: str
    background: str
    output_format: str
    output_compression: int
    seed: int
    response_format: str = "b64_json"
    stream: bool = False
    partial_images: int = 0
    adapters: tuple[AdapterRef, ...] = ()
    adapters_param: str = "lora"  # where the request named them: `lora` or `model`
    references_per_call: bool = False  # the family's pipeline shares input images per call
    moderation: str = "auto"  # `low` relaxes what the model's safety config says

    @property
    def size(self) -> str:
        return format_wxh(self.width, self.height)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    def to_json(self) -> str:
        return json.dumps(to_jsonable(self))

    @classmethod
    def from_json(cls, text: str) -> ResolvedGeneration:
        return from_jsonable(cls, json.loads(text))

    def to_model_request(
        self,
        request_id: str,
        conditioning: Conditioning | None = None,
        moderation_inputs: tuple[Any, ...] = (),
    ) -> ModelRequest:
        """The model request a replica runs for this HTTP request (edits add their conditioning,
        and, where the model checks input images, their downscaled copies)."""
        return ModelRequest(
            request_id=request_id,
            prompt=self.prompt,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance=self.guidance,
            seeds=tuple(self.seeds),
            output_format=self.output_format,
            output_compression=self.output_compression,
            conditioning=(conditioning.canvas,) if conditioning else (),
            init_image=conditioning.init_image if conditioning else None,
            mask=conditioning.mask if conditioning else None,
            preview_steps=preview_steps(self.partial_images, self.steps) if self.stream else (),
            adapters=self.adapters,
            references_key=references_key(conditioning) if self.references_per_call else "",
            moderation=self.moderation,
            moderation_inputs=moderation_inputs,
        )


def references_key(conditioning: Conditioning | None) -> str:
    """A digest of an edit's input images (canvas, and the mask of a masked edit): equal keys,
    equal inputs."""
    if conditioning is None:
        return ""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for image in (conditioning.canvas, conditioning.init_image, conditioning.mask):
        if image is not None:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(image.tobytes())
    return digest.hexdigest()


def preview_steps(partial_images: int, steps: int) -> tuple[int, ...]:
    """Evenly spaced steps (0-based, before the last) after which to send previews.

    `partial_images` previews split the run into equal parts; with too few steps, fewer previews
    are sent (never a duplicate, never the final image).
    """
    if partial_images <= 0 or steps <= 1:
        return ()
    chosen = {round((k + 1) * steps / (partial_images + 1)) - 1 for k in range(partial_images)}
    return tuple(sorted(step for step in chosen if 0 <= step < steps - 1))


def parse_size(size: str | None, model: ModelConfig) -> tuple[int, int]:
    """`auto`/absent -> the model default; `WxH` -> checked against the model's bounds."""
    if size is None or size == "auto":
        size = model.default_size
    try:
        width, height = parse_wxh(size)
    except ValueError:
        raise APIError(
            f"Invalid size {shown(size)}: use 'auto' or 'WIDTHxHEIGHT', e.g. '1024x1024'.",
            param="size",
        ) from None
    if width % PATCH or height % PATCH:
        raise APIError(
            f"Invalid size {shown(size)}: width and height must be multiples of {PATCH}.",
            param="size",
        )
    for side in (width, height):
        if not model.min_side <= side <= model.max_side:
            raise APIError(
                f"Invalid size {shown(size)}: each side must be between {model.min_side} and "
                f"{model.max_side} pixels for model {model.id!r}.",
                param="size",
            )
    if width * height > model.max_pixels:
        raise APIError(
            f"Invalid size {shown(size)}: {width * height} pixels exceeds the limit of "
            f"{model.max_pixels} for model {model.id!r}.",
            param="size",
        )
    return width, height


def resolve_quality(quality: str | None, model: ModelConfig) -> str:
    """Map an OpenAI quality onto one of our presets (low/medium/high)."""
    if quality is None or quality == "auto":
        return model.default_quality
    if quality not in QUALITIES:
        raise APIError(
            f"Invalid quality {shown(quality)}: expected one of {', '.join(QUALITIES)}.",
            param="quality",
        )
    return QUALITY_ALIASES.get(quality, quality)


def _choice(value: str | None, allowed: tuple[str, ...], default: str, param: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise APIError(
            f"Invalid {param} {shown(value)}: expected one of {', '.join(allowed)}.", param=param
        )
    return value


def endpoint_of(request: ImageOptions) -> Endpoint:
    if isinstance(request, ImageEditRequest):
        return "edits"
    if isinstance(request, ImageVariationRequest):
        return "variations"
    return "generations"


def select_model_and_adapter(
    requested: str | None, models: dict[str, ModelConfig], endpoint: Endpoint = "generations"
) -> tuple[ModelConfig, str | None]:
    """The named model and, for `<model>:<adapter>`, the adapter name; unknown models are a 404,
    a model whose family does not serve `endpoint` a 400. Without `model`: the first model
    that serves the endpoint.

    A model id may itself contain `:`; the full name is looked up first."""
    if requested is None or requested == "":
        serving = [model for model in models.values() if traits(model.family).serves(endpoint)]
        return (serving or list(models.values()))[0], None
    model, adapter = _named_model(requested, models)
    return check_endpoint(model, endpoint), adapter


def check_endpoint(model: ModelConfig, endpoint: Endpoint) -> ModelConfig:
    family = traits(model.family)
    if not family.serves(endpoint):
        serving = ", ".join(f"/v1/images/{name}" for name in family.endpoints)
        raise APIError(
            f"Model {model.id!r} ({family.title}) does not serve /v1/images/{endpoint}; it "
            f"serves {serving}. GET /v1/models lists what each model serves.",
            param="model",
            code="invalid_value",
        )
    return model


def _named_model(requested: str, models: dict[str, ModelConfig]) -> tuple[ModelConfig, str | None]:
    if requested in models:
        return models[requested], None
    base, colon, adapter = requested.rpartition(":")
    if colon and base in models:
        if not models[base].lora.enabled:
            raise not_found(adapter[:SHOWN_CHARS], base, "model")
        return models[base], check_name(adapter, "model")
    raise APIError(
        f"The model {shown(requested)} does not exist. Available: {', '.join(models)}.",
        status=404,
        param="model",
        code="model_not_found",
    )


def resolve_adapters(
    request: ImageOptions, model: ModelConfig, from_model: str | None
) -> tuple[tuple[AdapterRef, ...], str]:
    """The request's adapters, sorted by name, and the parameter that named them. Names and
    scales are checked here; whether the files exist is the registry's question (I/O)."""
    if from_model is not None:
        if request.lora:
            raise APIError(
                "Name adapters either in 'model' ('<model>:<adapter>') or in 'lora', not both.",
                param="lora",
            )
        if not model.lora.min_scale <= 1.0 <= model.lora.max_scale:
            raise APIError(
                f"'{model.id}:{from_model}' applies the adapter at scale 1, outside this model's "
                f"range [{model.lora.min_scale}, {model.lora.max_scale}]; use 'lora' with a scale.",
                param="model",
            )
        return (AdapterRef(from_model, 1.0),), "model"
    if not request.lora:
        return (), "lora"
    config = model.lora
    if not config.enabled:
        raise not_found(request.lora[0].name[:SHOWN_CHARS], model.id, "lora")
    if len(request.lora) > config.max_per_request:
        raise APIError(
            f"{len(request.lora)} adapters requested; model {model.id!r} combines at most "
            f"{config.max_per_request} per request.",
            param="lora",
            code="too_many_adapters",
        )
    seen: set[str] = set()
    for item in request.lora:
        check_name(item.name, "lora")
        if item.name in seen:
            raise APIError(f"Adapter {item.name!r} is listed twice.", param="lora")
        seen.add(item.name)
        if not config.min_scale <= item.scale <= config.max_scale:
            raise APIError(
                f"Invalid scale {item.scale} for adapter {item.name!r}: must be between "
                f"{config.min_scale} and {config.max_scale}.",
                param="lora",
            )
    adapters = sorted((AdapterRef(item.name, float(item.scale)) for item in request.lora),
                      key=lambda adapter: adapter.name)  # fmt: skip
    return tuple(adapters), "lora"


def auto_size(
    model: ModelConfig, input_size: tuple[int, int] | None, masked: bool
) -> tuple[int, int]:
    """`size=auto`: the model default; with an input image, its aspect at a preferred resolution.

    A masked edit keeps the input's own size when that is a valid size, so the unmasked region
    comes back pixel for pixel.
    """
    if input_size is None:
        return parse_size(None, model)
    if masked:
        try:
            return parse_size(format_wxh(*input_size), model)
        except APIError:
            pass
    return nearest_resolution(*input_size, model.resolution_buckets)


def _check_inputs(model: ModelConfig, masked: bool, input_images: int) -> None:
    """What the model's family can condition on: a mask, several input images."""
    family = traits(model.family)
    if masked and not family.masked_edits:
        raise APIError(
            f"Model {model.id!r} ({family.title}) does not support masked edits; send the edit "
            "without 'mask', or use a model that does (GET /v1/models).",
            param="mask",
            code="unsupported_value",
        )
    if input_images > 1 and not family.multi_image_edits:
        raise APIError(
            f"Model {model.id!r} ({family.title}) edits one input image; {input_images} were "
            "sent. Send one, or use a model that takes several (GET /v1/models).",
            param="image",
            code="unsupported_value",
        )


def _check_prompt(request: ImageOptions, model: ModelConfig, limits: UploadLimits | None) -> str:
    if isinstance(request, ImageVariationRequest):
        return model.variation_prompt
    if not isinstance(request, ImageGenerationRequest | ImageEditRequest):
        raise TypeError(f"no prompt on a {type(request).__name__}")
    prompt = request.prompt
    if not prompt.strip():
        raise APIError("'prompt' must not be empty.", param="prompt")
    if limits and len(prompt) > limits.max_prompt_chars:
        raise APIError(
            f"The prompt is {len(prompt)} characters long; the limit is {limits.max_prompt_chars}.",
            param="prompt",
            code="context_length_exceeded",
        )
    return prompt


def _check_streaming(request: ImageOptions, response_format: str) -> None:
    if request.stream and isinstance(request, ImageVariationRequest):
        raise APIError(
            "Streaming is available for generations and edits, not variations.",
            param="stream",
            code="unsupported_value",
        )
    if request.partial_images is not None and not request.stream:
        raise APIError("partial_images applies only with stream: true.", param="partial_images")
    if request.stream and response_format == "url":
        raise APIError(
            "Streamed images are sent as b64_json; response_format 'url' cannot be streamed.",
            param="response_format",
            code="unsupported_value",
        )


def resolve_generation(
    request: ImageOptions,
    models: dict[str, ModelConfig],
    max_n: int,
    *,
    limits: UploadLimits | None = None,
    input_size: tuple[int, int] | None = None,
    masked: bool = False,
    input_images: int = 0,
    key_allows_low: bool = True,
) -> ResolvedGeneration:
    """Apply defaults and bounds; raise `APIError` naming the first bad parameter.

    `input_size` is the (first) input image's size for edits and variations, `input_images`
    how many images an edit sent; `key_allows_low` whether the caller's API key may send
    `moderation: low`.
    """
    model, adapter_in_model = select_model_and_adapter(request.model, models, endpoint_of(request))
    _check_inputs(model, masked, input_images)
    prompt = _check_prompt(request, model, limits)
    adapters, adapters_param = resolve_adapters(request, model, adapter_in_model)
    if request.n > max_n:
        raise APIError(f"Invalid n {request.n}: must be between 1 and {max_n}.", param="n")
    if request.seed is not None and request.seed + request.n - 1 > MAX_SEED:
        raise APIError(
            f"Invalid seed {request.seed}: image i uses seed + i, so with n={request.n} the seed "
            f"must be at most {MAX_SEED - request.n + 1} (every returned seed must be one this "
            "API accepts).",
            param="seed",
        )
    background = _choice(request.background, BACKGROUNDS, "auto", "background")
    if background == "transparent":
        raise APIError(
            f"background 'transparent' is not supported: model {model.id!r} cannot produce an "
            "alpha channel. Use 'auto' or 'opaque'.",
            param="background",
            code="unsupported_value",
        )
    response_format = _choice(
        request.response_format, RESPONSE_FORMATS, "b64_json", "response_format"
    )
    _check_streaming(request, response_format)
    moderation = check_moderation_value(
        request.moderation,
        model.safety.allow_low and key_allows_low,
        f"for model {model.id!r}" if not model.safety.allow_low else "for this API key",
    )
    output_format = _choice(request.output_format, OUTPUT_FORMATS, "png", "output_format")
    if request.output_compression is not None and output_format == "png":
        raise APIError(
            "output_compression applies only to output_format 'jpeg' or 'webp'.",
            param="output_compression",
        )
    if request.size in (None, "auto"):
        width, height = auto_size(model, input_size, masked)
    else:
        width, height = parse_size(request.size, model)
    if limits and request.n * width * height > limits.max_pixels_per_request:
        raise APIError(
            f"n={request.n} images of {width}x{height} is {request.n * width * height} pixels; "
            f"one request may ask for at most {limits.max_pixels_per_request}.",
            param="n",
        )
    quality = resolve_quality(request.quality, model)
    family = traits(model.family)
    if request.guidance is not None and not family.guidance:
        raise APIError(
            f"Model {model.id!r} ({family.title}) is step-distilled and takes no guidance; "
            "leave 'guidance' out.",
            param="guidance",
            code="unsupported_value",
        )
    return ResolvedGeneration(
        model_id=model.id,
        prompt=prompt,
        n=request.n,
        width=width,
        height=height,
        steps=request.num_inference_steps or getattr(model.quality_steps, quality),
        guidance=model.default_guidance if request.guidance is None else request.guidance,
        quality=quality,
        background="opaque",
        output_format=output_format,
        output_compression=100
        if request.output_compression is None
        else request.output_compression,
        seed=secrets.randbelow(2**31) if request.seed is None else request.seed,
        response_format=response_format,
        stream=bool(request.stream),
        partial_images=request.partial_images or 0,
        adapters=adapters,
        adapters_param=adapters_param,
        references_per_call=family.references_per_call,
        moderation=moderation,
    )


def build_usage(resolved: ResolvedGeneration, text_tokens: int, image_input_tokens: int) -> Usage:
    """Real counts: text (+ input image) tokens in, image tokens out."""
    input_tokens = text_tokens + image_input_tokens
    output_tokens = resolved.n * image_tokens(resolved.width, resolved.height)
    return Usage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(
            text_tokens=text_tokens, image_tokens=image_input_tokens
        ),
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        prompt_tokens=input_tokens,
    )
