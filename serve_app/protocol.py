"""OpenAI Images API wire format: request, response, stream-event and error models.

The wire format only: pydantic models that the ingress parses bodies with and serialises answers
with, and that `/openapi.json` is generated from. No resolution logic, no config, no torch or
Ray (defaults and bounds that depend on a model live in `serve_app.resolution`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


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


class PartialImageEvent(ImageStreamEvent):
    """`event: image_generation.partial_image` (or `image_edit.partial_image`): a preview."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class CompletedImageEvent(ImageStreamEvent):
    """`event: image_generation.completed` (or `image_edit.completed`): one final image."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: Usage
