"""OpenAI Images API wire format: request, response, stream-event and error models.

The wire format only: pydantic models that the ingress parses bodies with and serialises answers
with, and that `/openapi.json` is generated from. No resolution logic, no config, no torch or
Ray (defaults and bounds that depend on a model live in `serve_app.resolution`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

MAX_SEED = 2**63 - 1
MAX_USER_CHARS = 256  # OpenAI's `user` is a short id; it is written to every request's log line
SHOWN_CHARS = 80  # how much of a client's value an error message or log line repeats


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied value as an error message quotes it: `repr` of at most `limit`
    characters, `...` after it when cut (a 900 kB `size` must not come back whole)."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


_ASCII_INTEGER = re.compile(r"-?[0-9]+")
_ASCII_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _is_form(info: ValidationInfo) -> bool:
    """Multipart forms send every field as text; JSON bodies (the default) have real types."""
    return bool(info.context and info.context.get("form"))


def _strict_number(value: Any, info: ValidationInfo, *, whole: bool) -> Any:
    """JSON: a JSON number (an integer when `whole`), never a boolean or a string. Forms: ASCII
    digits (`str.isdigit` and `int()` take any script's digits; the API does not)."""
    if value is None:
        return value
    kind = "an integer" if whole else "a number"
    if _is_form(info):
        pattern = _ASCII_INTEGER if whole else _ASCII_NUMBER
        if not (isinstance(value, str) and pattern.fullmatch(value.strip())):
            raise ValueError(f"must be {kind} in ASCII digits")
        return int(value) if whole else float(value)
    allowed = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise ValueError(f"must be {kind} (a JSON number{' without a fraction' if whole else ''})")
    return value


class RequestModel(BaseModel):
    """Requests ignore unknown fields (SDKs add new ones; documented in docs/api.md); known
    fields are type-checked strictly: JSON numbers and booleans must be JSON numbers and
    booleans, form fields ASCII numbers and `true`/`false`."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _encodable_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "must be valid Unicode text (it has an unpaired surrogate)"
                ) from None
        return value


class LoraRequest(RequestModel):
    """Extension: one LoRA adapter to apply, by its name in `GET /v1/models` (after `:`)."""

    name: str = Field(description="Adapter name.")
    scale: float = Field(
        default=1.0, description="Adapter weight (the model's `lora` range; 0 = off)."
    )

    @field_validator("scale", mode="before")
    @classmethod
    def _number(cls, value: Any, info: ValidationInfo) -> Any:
        return _strict_number(value, info, whole=False)


class ImageOptions(RequestModel):
    """Fields shared by all three endpoints. `seed` and `num_inference_steps` are extensions."""

    model: str | None = Field(
        default=None, description="Model id; default: the first configured model."
    )
    n: int = Field(default=1, ge=1, description="Number of images (1 to the configured `max_n`).")
    size: str | None = Field(default=None, description="`auto` or `WxH`, sides multiples of 16.")
    quality: str | None = Field(
        default=None, description="`auto|low|medium|high` (`standard`, `hd`)."
    )
    background: str | None = Field(
        default=None, description="`auto|opaque` (`transparent` unsupported)."
    )
    output_format: str | None = Field(default=None, description="`png|jpeg|webp`; default png.")
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="0-100 for jpeg/webp; default 100 (best quality)."
    )
    response_format: str | None = Field(default=None, description="`b64_json` (default) or `url`.")
    guidance: float | None = Field(default=None, ge=0, le=100, description="Guidance scale.")
    user: str | None = Field(
        default=None,
        max_length=MAX_USER_CHARS,
        description=f"End-user id (at most {MAX_USER_CHARS} characters); written to logs only.",
    )
    stream: bool | None = Field(
        default=None, description="Server-sent events: partial images, then the final ones."
    )
    partial_images: int | None = Field(
        default=None, ge=0, le=3, description="Previews per image while streaming (0-3); default 0."
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Extension: image i uses `seed + i`; random if absent.",
    )
    num_inference_steps: int | None = Field(
        default=None, ge=1, le=100, description="Extension: denoising steps, overriding `quality`."
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Extension, with `Prefer: respond-async`: POST the finished job object here "
        "(signed the Standard Webhooks way).",
    )
    moderation: str | None = Field(
        default=None,
        description="`auto` (default) or `low`: what `low` relaxes is the model's "
        "`safety` config (docs/operations.md); the operator may forbid `low` (400).",
    )
    lora: list[LoraRequest] | None = Field(
        default=None,
        description='Extension: LoRA adapters with weights, e.g. `[{"name": "style", '
        '"scale": 0.8}]`; multipart sends it as JSON text (or the SDK\'s `lora[][name]` / '
        '`lora[][scale]` fields). `model="<model>:<adapter>"` is one adapter at scale 1.',
    )

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_list(cls, value: Any, info: ValidationInfo) -> Any:
        if _is_form(info) and isinstance(value, str):
            try:
                value = json.loads(value)
            except RecursionError:
                raise ValueError("must be a JSON list; this JSON is nested too deeply") from None
            except ValueError:
                raise ValueError(
                    'must be a JSON list like [{"name": "style", "scale": 0.8}]'
                ) from None
            if not isinstance(value, list):
                raise ValueError('must be a JSON list like [{"name": "style", "scale": 0.8}]')
            # JSON text carries real numbers: validate them as JSON, not as form text.
            try:
                return [LoraRequest.model_validate(item) for item in value]
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(part) for part in first["loc"])
                message = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"{where}: {message}" if where else message) from None
        return value

    @field_validator(
        "n", "output_compression", "partial_images", "seed", "num_inference_steps", mode="before"
    )
    @classmethod
    def _whole_number(cls, value: Any, info: ValidationInfo) -> Any:
        return _strict_number(value, info, whole=True)

    @field_validator("guidance", mode="before")
    @classmethod
    def _number(cls, value: Any, info: ValidationInfo) -> Any:
        return _strict_number(value, info, whole=False)

    @field_validator("stream", mode="before")
    @classmethod
    def _boolean(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if _is_form(info) and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("must be a boolean (true or false)")


class ImageGenerationRequest(ImageOptions):
    """`POST /v1/images/generations` (JSON)."""

    prompt: str = Field(description="Text description of the image.")


class ImageURL(RequestModel):
    """An input image in JSON edits: a `data:` URL (remote URLs and file ids are refused)."""

    image_url: str | None = Field(default=None, description="`data:image/png;base64,...`")
    file_id: str | None = Field(default=None, description="Not supported: send the image itself.")


class ImageEditRequest(ImageOptions):
    """`POST /v1/images/edits`; `images`/`mask` are the JSON form (multipart sends files)."""

    prompt: str = Field(description="How to edit the image(s).")
    images: list[ImageURL] | None = Field(default=None, description="JSON form: input images.")
    mask: ImageURL | None = Field(default=None, description="JSON form: mask, alpha 0 = editable.")


class ImageVariationRequest(ImageOptions):
    """`POST /v1/images/variations` (multipart): the instruction is the model's config."""


class AdapterUsed(BaseModel):
    name: str
    scale: float


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="Extension: the seed that reproduces this image.")
    lora: list[AdapterUsed] | None = Field(
        default=None,
        description="Extension: the LoRA adapters that produced this image (none: null).",
    )


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


class ModelLimits(BaseModel):
    """Extension: what a request to this model may ask for (the playground shows it)."""

    min_side: int
    max_side: int
    max_pixels: int
    max_n: int
    default_size: str
    sizes: list[str] = Field(description="The model's preferred `WxH` resolutions.")
    quality_steps: dict[str, int] = Field(description="Denoising steps per `quality`.")
    masked_edits: bool = Field(default=True, description="Edits may carry a `mask`.")
    multi_image_edits: bool = Field(
        default=True, description="Edits may carry several input images."
    )


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "serve_app"
    family: str | None = Field(
        default=None, description="Extension: the model family (docs/api.md), e.g. `flux`."
    )
    endpoints: list[str] | None = Field(
        default=None,
        description="Extension: the endpoints this model serves, of `generations`, `edits`, "
        "`variations` (others answer 400 naming `model`).",
    )
    limits: ModelLimits | None = Field(default=None, description="Extension: this model's limits.")
    parent: str | None = Field(
        default=None, description="Extension: for `<model>:<adapter>` entries, the base model."
    )


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


PartialImageType = Literal["image_generation.partial_image", "image_edit.partial_image"]
CompletedImageType = Literal["image_generation.completed", "image_edit.completed"]


class ImageStreamEvent(BaseModel):
    """Fields every image stream event has. `image_index` and `seed` are extensions that say
    which of the request's `n` images the event belongs to."""

    b64_json: str
    background: str
    created_at: int
    output_format: str
    quality: str
    size: str
    image_index: int = Field(description="Extension: which of the request's images (0-based).")
    seed: int = Field(description="Extension: the seed of that image.")
    lora: list[AdapterUsed] | None = Field(
        default=None, description="Extension: the LoRA adapters that produced this image."
    )


class PartialImageEvent(ImageStreamEvent):
    """`event: image_generation.partial_image` (or `image_edit.partial_image`): a preview."""

    type: PartialImageType
    partial_image_index: int


class CompletedImageEvent(ImageStreamEvent):
    """`event: image_generation.completed` (or `image_edit.completed`): one final image."""

    type: CompletedImageType
    usage: Usage


JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class ImageJobObject(BaseModel):
    """Extension: an asynchronous job (`Prefer: respond-async`), as `GET /v1/images/jobs/{id}`
    and webhooks send it."""

    id: str
    object: Literal["image.job"] = "image.job"
    status: JobStatus
    created_at: int
    model: str
    endpoint: str = Field(description="`generations`, `edits` or `variations`.")
    queue_position: int | None = Field(
        default=None, description="While queued: how many jobs are ahead (0 = next)."
    )
    progress: float = Field(default=0.0, description="0-1, from the denoising steps done.")
    started_at: int | None = None
    completed_at: int | None = None
    attempts: int = Field(default=0, description="Times a consumer started it (retries count).")
    result: ImagesResponse | None = Field(
        default=None, description="When completed: exactly what the synchronous call answers."
    )
    error: ErrorInfo | None = Field(default=None, description="When failed: OpenAI's error object.")


class ImageJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImageJobObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
