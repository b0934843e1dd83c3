"""The FLUX.1 Kontext family on fal: [pro] and [max], text-to-image, edit and multi.

Priced per image: [pro] $0.04, [max] $0.08 (Black Forest Labs' and fal's lists).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field

from airflow_flux.families.common import FluxRequest, OutputFormat, PerImage, PriceRule, tolerance_to_str

#: The fal model this provider was built for first, and the rest of the family.
KONTEXT_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
KONTEXT_EDIT = "fal-ai/flux-pro/kontext"
KONTEXT_MULTI = "fal-ai/flux-pro/kontext/multi"
KONTEXT_MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
KONTEXT_MAX_EDIT = "fal-ai/flux-pro/kontext/max"
KONTEXT_MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"

ASPECT_RATIOS: tuple[str, ...] = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
SafetyTolerance = Literal["1", "2", "3", "4", "5", "6"]


class _KontextRequest(FluxRequest):
    """The fields every FLUX.1 Kontext endpoint shares.

    :param prompt: what to draw (or how to edit); must not be empty.
    :param seed: makes the output reproducible for the same prompt and settings.
    :param guidance_scale: how closely to follow the prompt, 1 to 20 (API default 3.5).
    :param num_images: images to generate, 1 to 4 (API default 1).
    :param output_format: ``jpeg`` or ``png`` (API default ``jpeg``).
    :param safety_tolerance: ``"1"`` (strictest) to ``"6"`` (API default ``"2"``).
    :param aspect_ratio: one of 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21 (text-to-image
        default 1:1; an edit keeps its input's when unset).
    :param enhance_prompt: let the API rewrite the prompt before generating.
    :param sync_mode: return images inline as ``data:`` URIs instead of CDN URLs.
    """

    prompt: str = Field(min_length=1)
    seed: int | None = None
    guidance_scale: float | None = Field(default=None, ge=1, le=20)
    num_images: int | None = Field(default=None, ge=1, le=4)
    output_format: OutputFormat | None = None
    safety_tolerance: Annotated[SafetyTolerance | None, BeforeValidator(tolerance_to_str)] = None
    aspect_ratio: AspectRatio | None = None
    enhance_prompt: bool | None = None
    sync_mode: bool | None = None


class KontextTextToImageRequest(_KontextRequest):
    """Input of ``fal-ai/flux-pro/kontext/text-to-image``: the shared fields."""

    endpoint: ClassVar[str] = KONTEXT_TEXT_TO_IMAGE


class KontextEditRequest(_KontextRequest):
    """Input of ``fal-ai/flux-pro/kontext`` (an edit of one image).

    :param image_url: the image to edit: a URL fal can fetch without credentials, or a
        ``data:`` URI (the operators turn ``s3://`` URIs into one of these).
    """

    endpoint: ClassVar[str] = KONTEXT_EDIT

    image_url: str = Field(min_length=1)


class KontextMultiRequest(_KontextRequest):
    """Input of ``fal-ai/flux-pro/kontext/multi`` (several reference images).

    :param image_urls: the reference images, at least one (URLs or ``data:`` URIs).
    """

    endpoint: ClassVar[str] = KONTEXT_MULTI

    image_urls: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)


class KontextMaxTextToImageRequest(KontextTextToImageRequest):
    """Input of ``fal-ai/flux-pro/kontext/max/text-to-image``."""

    endpoint: ClassVar[str] = KONTEXT_MAX_TEXT_TO_IMAGE


class KontextMaxEditRequest(KontextEditRequest):
    """Input of ``fal-ai/flux-pro/kontext/max``."""

    endpoint: ClassVar[str] = KONTEXT_MAX_EDIT


class KontextMaxMultiRequest(KontextMultiRequest):
    """Input of ``fal-ai/flux-pro/kontext/max/multi``."""

    endpoint: ClassVar[str] = KONTEXT_MAX_MULTI


#: This family's request models by endpoint.
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    model.endpoint: model
    for model in (
        KontextTextToImageRequest,
        KontextEditRequest,
        KontextMultiRequest,
        KontextMaxTextToImageRequest,
        KontextMaxEditRequest,
        KontextMaxMultiRequest,
    )
}

#: One price rule per endpoint: US dollars per generated image.
PRICES: dict[str, PriceRule] = {
    KONTEXT_TEXT_TO_IMAGE: PerImage(0.04),
    KONTEXT_EDIT: PerImage(0.04),
    KONTEXT_MULTI: PerImage(0.04),
    KONTEXT_MAX_TEXT_TO_IMAGE: PerImage(0.08),
    KONTEXT_MAX_EDIT: PerImage(0.08),
    KONTEXT_MAX_MULTI: PerImage(0.08),
}
