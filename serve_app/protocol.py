"""OpenAI Images API wire format: request/response models, errors, size and quality resolution.

Pure pydantic; no torch, no Ray, no Starlette. The ingress parses with these models and the
resolution functions turn a request plus a model's config into the exact work to do, failing fast
with the offending ``param`` named.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.config import ModelConfig, UploadLimits
from serve_app.imageops import nearest_resolution

# OpenAI names "standard"/"hd" (dall-e-3) map onto our presets.
QUALITY_ALIASES = {"standard": "medium", "hd": "high"}
QUALITIES = ("auto", "low", "medium", "high", *QUALITY_ALIASES)
BACKGROUNDS = ("auto", "opaque", "transparent")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")
MAX_SEED = 2**63 - 1
PATCH = 16  # FLUX: VAE /8 then 2x2 packing -> one image token per 16x16 pixels


class APIError(Exception):
    """An error the client should see, in OpenAI's envelope, with an HTTP status."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        # A 400 about one parameter is an invalid value unless a more specific code is given.
        self.code = code or ("invalid_value" if param and status == 400 else None)
        self.type = type or _default_error_type(status)
        self.headers = headers or {}

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (_rebuild_api_error, (self.message, self.status, self.param, self.code, self.type))

    def to_body(self) -> dict[str, Any]:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()


def _rebuild_api_error(message, status, param, code, type_) -> APIError:
    return APIError(message, status=status, param=param, code=code, type=type_)


def _default_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class RequestModel(BaseModel):
    """Requests ignore unknown fields (SDKs add new ones); known fields are type-checked."""

    model_config = ConfigDict(extra="ignore")


class ImageOptions(RequestModel):
    """Fields shared by all three endpoints. `seed` and `num_inference_steps` are extensions."""

    model: str | None = Field(None, description="Model id; default: the first configured model.")
    n: int = Field(1, ge=1, description="Number of images (1 to the configured `max_n`).")
    size: str | None = Field(None, description="`auto` or `WxH`, sides multiples of 16.")
    quality: str | None = Field(None, description="`auto|low|medium|high` (`standard`, `hd`).")
    background: str | None = Field(None, description="`auto|opaque` (`transparent` unsupported).")
    output_format: str | None = Field(None, description="`png|jpeg|webp`; default png.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="0-100 for jpeg/webp; default 100 (best quality)."
    )
    response_format: str | None = Field(None, description="`b64_json` (default) or `url`.")
    guidance: float | None = Field(None, ge=0, le=100, description="Guidance scale.")
    user: str | None = Field(None, description="End-user id; written to logs only.")
    stream: bool | None = Field(
        None, description="Server-sent events: partial images, then the final ones."
    )
    partial_images: int | None = Field(
        None, ge=0, le=3, description="Previews per image while streaming (0-3); default 0."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Extension: image i uses `seed + i`; random if absent."
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=100, description="Extension: denoising steps, overriding `quality`."
    )


class ImageGenerationRequest(ImageOptions):
    """`POST /v1/images/generations` (JSON)."""

    prompt: str = Field(description="Text description of the image.")


class ImageURL(RequestModel):
    """An input image in JSON edits: a `data:` URL (remote URLs and file ids are refused)."""

    image_url: str | None = Field(None, description="`data:image/png;base64,...`")
    file_id: str | None = Field(None, description="Not supported: send the image itself.")


class ImageEditRequest(ImageOptions):
    """`POST /v1/images/edits`; `images`/`mask` are the JSON form (multipart sends files)."""

    prompt: str = Field(description="How to edit the image(s).")
    images: list[ImageURL] | None = Field(None, description="JSON form: input images.")
    mask: ImageURL | None = Field(None, description="JSON form: mask, alpha 0 = editable.")


class ImageVariationRequest(ImageOptions):
    """`POST /v1/images/variations` (multipart): the instruction is the model's config."""


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="Extension: the seed that reproduces this image.")


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    total_tokens: int
    prompt_tokens: int = Field(description="Same as input_tokens, for older clients.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: str
    output_format: str
    size: str
    quality: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "serve_app"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


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

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def image_tokens_per_image(self) -> int:
        return image_tokens(self.width, self.height)


def image_tokens(width: int, height: int) -> int:
    """Image tokens of a FLUX image: one per 16x16 pixel patch."""
    return (width // PATCH) * (height // PATCH)


def parse_model(model_cls: type[RequestModel], data: Any) -> RequestModel:
    """Validate a decoded body; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise APIError("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_api_error(exc) from None


def validation_error_to_api_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        value = first.get("input")
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        message = f"Invalid value for '{param}': {first['msg']} (got {shown[:100]})."
    return APIError(message, param=param)


def parse_size(size: str | None, model: ModelConfig) -> tuple[int, int]:
    """`auto`/absent -> the model default; `WxH` -> checked against the model's bounds."""
    if size is None or size == "auto":
        size = model.default_size
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size.strip())
    if not match:
        raise APIError(
            f"Invalid size {size!r}: use 'auto' or 'WIDTHxHEIGHT', e.g. '1024x1024'.", param="size"
        )
    width, height = int(match[1]), int(match[2])
    if width % PATCH or height % PATCH:
        raise APIError(
            f"Invalid size {size!r}: width and height must be multiples of {PATCH}.", param="size"
        )
    for side in (width, height):
        if not model.min_side <= side <= model.max_side:
            raise APIError(
                f"Invalid size {size!r}: each side must be between {model.min_side} and "
                f"{model.max_side} pixels for model {model.id!r}.",
                param="size",
            )
    if width * height > model.max_pixels:
        raise APIError(
            f"Invalid size {size!r}: {width * height} pixels exceeds the limit of "
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
            f"Invalid quality {quality!r}: expected one of {', '.join(QUALITIES)}.",
            param="quality",
        )
    return QUALITY_ALIASES.get(quality, quality)


def _choice(value: str | None, allowed: tuple[str, ...], default: str, param: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise APIError(
            f"Invalid {param} {value!r}: expected one of {', '.join(allowed)}.", param=param
        )
    return value


def select_model(requested: str | None, models: dict[str, ModelConfig]) -> ModelConfig:
    """The named model, or the first configured one; unknown names are a 404."""
    if requested is None or requested == "":
        return next(iter(models.values()))
    if requested not in models:
        raise APIError(
            f"The model {requested!r} does not exist. Available: {', '.join(models)}.",
            status=404,
            param="model",
            code="model_not_found",
        )
    return models[requested]


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
            return parse_size(f"{input_size[0]}x{input_size[1]}", model)
        except APIError:
            pass
    return nearest_resolution(*input_size, model.resolution_buckets)


def resolve_generation(
    request: ImageOptions,
    models: dict[str, ModelConfig],
    max_n: int,
    *,
    limits: UploadLimits | None = None,
    input_size: tuple[int, int] | None = None,
    masked: bool = False,
) -> ResolvedGeneration:
    """Apply defaults and bounds; raise `APIError` naming the first bad parameter.

    `input_size` is the (first) input image's size for edits and variations.
    """
    model = select_model(request.model, models)
    if isinstance(request, ImageVariationRequest):
        prompt = model.variation_prompt
    else:
        prompt = request.prompt
        if not prompt.strip():
            raise APIError("'prompt' must not be empty.", param="prompt")
        if limits and len(prompt) > limits.max_prompt_chars:
            raise APIError(
                f"The prompt is {len(prompt)} characters long; the limit is "
                f"{limits.max_prompt_chars}.",
                param="prompt",
                code="context_length_exceeded",
            )
    if request.n > max_n:
        raise APIError(f"Invalid n {request.n}: must be between 1 and {max_n}.", param="n")
    if request.stream and isinstance(request, ImageVariationRequest):
        raise APIError(
            "Streaming is available for generations and edits, not variations.",
            param="stream",
            code="unsupported_value",
        )
    if request.partial_images is not None and not request.stream:
        raise APIError("partial_images applies only with stream: true.", param="partial_images")
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
    if request.stream and response_format == "url":
        raise APIError(
            "Streamed images are sent as b64_json; response_format 'url' cannot be streamed.",
            param="response_format",
            code="unsupported_value",
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
    steps = request.num_inference_steps or getattr(model.quality_steps, quality)
    return ResolvedGeneration(
        model_id=model.id,
        prompt=prompt,
        n=request.n,
        width=width,
        height=height,
        steps=steps,
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
    )


def build_usage(resolved: ResolvedGeneration, text_tokens: int, image_input_tokens: int) -> Usage:
    """Real counts: text (+ input image) tokens in, image tokens out."""
    input_tokens = text_tokens + image_input_tokens
    output_tokens = resolved.n * resolved.image_tokens_per_image
    return Usage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(
            text_tokens=text_tokens, image_tokens=image_input_tokens
        ),
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        prompt_tokens=input_tokens,
    )


def build_images_response(
    resolved: ResolvedGeneration,
    b64_images: list[str] | None,
    text_tokens: int,
    image_input_tokens: int = 0,
    urls: list[str] | None = None,
) -> ImagesResponse:
    """OpenAI's response shape for all three endpoints."""
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(b64_json=b64, url=url, seed=seed)
            for b64, url, seed in zip(
                b64_images or [None] * resolved.n,
                urls or [None] * resolved.n,
                resolved.seeds,
                strict=True,
            )
        ],
        background=resolved.background,
        output_format=resolved.output_format,
        size=resolved.size,
        quality=resolved.quality,
        usage=build_usage(resolved, text_tokens, image_input_tokens),
    )


def stream_event(
    resolved: ResolvedGeneration,
    kind: str,
    image_index: int,
    b64_json: str,
    partial_image_index: int | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One streaming event: `{kind}.partial_image` (with an index) or `{kind}.completed`.

    `kind` is `image_generation` or `image_edit`. `image_index` and `seed` are extensions that say
    which of the request's `n` images the event belongs to.
    """
    event: dict[str, Any] = {
        "type": f"{kind}.partial_image" if usage is None else f"{kind}.completed",
        "b64_json": b64_json,
        "background": resolved.background,
        "created_at": int(time.time()),
        "output_format": resolved.output_format,
        "quality": resolved.quality,
        "size": resolved.size,
        "image_index": image_index,
        "seed": resolved.seed + image_index,
    }
    if usage is None:
        event["partial_image_index"] = partial_image_index
    else:
        event["usage"] = usage.model_dump()
    return event


def sse(event_type: str, data: dict[str, Any]) -> str:
    """A server-sent event as OpenAI sends them: `event:` line, `data:` JSON line, blank line."""
    return f"event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
