"""FLUX.2 on fal: [pro], [flex], [max] and [dev], text-to-image and edits, priced per megapixel.

From fal's model pages (``https://fal.ai/models/fal-ai/flux-2-*/llms.txt``) and the types of
fal's own JS client (``fal-ai/fal-js``, ``endpoints.ts``), checked 2026-12:

- The output size is ``image_size``: a preset or ``{"width": W, "height": H}`` (no
  ``aspect_ratio``). fal's ImageSize takes whole numbers above 0 and up to 14142; [dev]
  says 512 to 2048. The [pro], [flex] and [max] edits may also ask ``auto`` (their default:
  the size follows the input).
- [pro], [flex] and [max] make one image a request (no ``num_images``); [dev] makes 1 to 4.
- Prices are per megapixel, 1 MP being 1024 x 1024 pixels, each image rounded up on its own;
  the edits' input images count as processed megapixels.

Not confirmed on fal's pages, and so not enforced here: Black Forest Labs' own API wants
sides in multiples of 16 and at most 4 MP (fal resizes larger outputs, third-party pages
say), and fal states no maximum of reference images for the [pro], [flex] and [max] edits:
:data:`MAX_REFERENCES` is the largest figure published elsewhere (10, for [max]), so a
request is never refused that fal would take. [dev]'s edit uses its first 4 references and
ignores the rest (fal's words): more are refused, rather than paid for and ignored.
Whether fal bills an edit's inputs on [pro] and [dev] is stated on their pages; [max]'s
text-to-image has no inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from airflow_flux.families.common import FluxRequest, OutputFormat, PerMegapixel, PriceRule, tolerance_to_str

FLUX2_PRO = "fal-ai/flux-2-pro"
FLUX2_PRO_EDIT = "fal-ai/flux-2-pro/edit"
FLUX2_FLEX = "fal-ai/flux-2-flex"
FLUX2_FLEX_EDIT = "fal-ai/flux-2-flex/edit"
FLUX2_MAX = "fal-ai/flux-2-max"
FLUX2_MAX_EDIT = "fal-ai/flux-2-max/edit"
FLUX2_DEV = "fal-ai/flux-2"
FLUX2_DEV_EDIT = "fal-ai/flux-2/edit"

#: fal's size presets and the pixels each stands for (fal's ImageSize enum).
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
#: What an edit may ask instead: the output follows the input's size.
AUTO = "auto"
#: A custom size's sides, in pixels: fal's ImageSize (above 0, at most 14142), [dev]'s (512 to 2048).
SIDES = (1, 14142)
DEV_SIDES = (512, 2048)
#: Most reference images of an edit: [dev] uses its first 4; for the others, see above.
MAX_REFERENCES = 10
DEV_MAX_REFERENCES = 4

SafetyTolerance = Literal["1", "2", "3", "4", "5"]
DevOutputFormat = Literal["jpeg", "png", "webp"]
Acceleration = Literal["none", "regular", "high"]


def _allowed_sizes(sides: tuple[int, int], *, auto: bool) -> str:
    presets = ", ".join(repr(p) for p in (*IMAGE_SIZE_PRESETS, *((AUTO,) if auto else ())))
    return f"one of {presets}, or {{'width': W, 'height': H}} with W and H whole numbers from {sides[0]} to {sides[1]}"


def _image_size(value: Any, *, sides: tuple[int, int] = SIDES, auto: bool = False) -> Any:
    """A preset name or ``{"width", "height"}``, checked; refused with what is allowed."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip()
        if name in IMAGE_SIZE_PRESETS or (auto and name == AUTO):
            return name
    elif isinstance(value, Mapping) and set(value) == {"width", "height"}:
        width, height = value["width"], value["height"]
        if all(isinstance(v, int) and not isinstance(v, bool) and sides[0] <= v <= sides[1] for v in (width, height)):
            return {"width": width, "height": height}
    raise PydanticCustomError("image_size", "must be {allowed}", {"allowed": _allowed_sizes(sides, auto=auto)})


def size_of(image_size: Any) -> tuple[int, int] | None:
    """The pixels ``image_size`` asks for (None: ``auto`` or unset, the API decides)."""
    if isinstance(image_size, str):
        return IMAGE_SIZE_PRESETS.get(image_size)
    if isinstance(image_size, Mapping):
        return int(image_size["width"]), int(image_size["height"])
    return None


ImageSize = Annotated[Any, BeforeValidator(lambda v: _image_size(v))]
EditImageSize = Annotated[Any, BeforeValidator(lambda v: _image_size(v, auto=True))]
DevImageSize = Annotated[Any, BeforeValidator(lambda v: _image_size(v, sides=DEV_SIDES))]
_Url = Annotated[str, Field(min_length=1)]
References = Annotated[list[_Url], Field(min_length=1, max_length=MAX_REFERENCES)]
DevReferences = Annotated[list[_Url], Field(min_length=1, max_length=DEV_MAX_REFERENCES)]


class _Flux2Request(FluxRequest):
    """The fields every FLUX.2 endpoint shares.

    :param prompt: what to draw (or how to edit); must not be empty.
    :param image_size: a preset (``square_hd``, ``square``, ``portrait_4_3``, ``portrait_16_9``,
        ``landscape_4_3``, ``landscape_16_9``) or ``{"width": W, "height": H}``.
    :param seed: makes the output reproducible for the same prompt and settings.
    :param safety_tolerance: ``"1"`` (strictest) to ``"5"`` (API default ``"2"``).
    :param enable_safety_checker: let the API check the output (API default true).
    :param output_format: ``jpeg`` or ``png``.
    :param sync_mode: return images inline as ``data:`` URIs instead of CDN URLs.
    """

    prompt: str = Field(min_length=1)
    image_size: ImageSize = None
    seed: int | None = None
    safety_tolerance: Annotated[SafetyTolerance | None, BeforeValidator(tolerance_to_str)] = None
    enable_safety_checker: bool | None = None
    output_format: OutputFormat | None = None
    sync_mode: bool | None = None


class Flux2ProRequest(_Flux2Request):
    """Input of ``fal-ai/flux-2-pro``: one image a request."""

    endpoint: ClassVar[str] = FLUX2_PRO


class Flux2ProEditRequest(_Flux2Request):
    """Input of ``fal-ai/flux-2-pro/edit``: one image a request, from its references.

    :param image_urls: the reference images, 1 to 10 (URLs or ``data:`` URIs; the operators
        turn ``s3://`` URIs into one of these).
    """

    endpoint: ClassVar[str] = FLUX2_PRO_EDIT

    image_size: EditImageSize = None
    image_urls: References


class Flux2MaxRequest(Flux2ProRequest):
    """Input of ``fal-ai/flux-2-max``: one image a request."""

    endpoint: ClassVar[str] = FLUX2_MAX


class Flux2MaxEditRequest(Flux2ProEditRequest):
    """Input of ``fal-ai/flux-2-max/edit``."""

    endpoint: ClassVar[str] = FLUX2_MAX_EDIT


class Flux2FlexRequest(_Flux2Request):
    """Input of ``fal-ai/flux-2-flex``: steps and guidance are the caller's; one image a request.

    :param num_inference_steps: denoising steps, 2 to 50 (API default 28).
    :param guidance_scale: how closely to follow the prompt, 1.5 to 10 (API default 3.5).
    """

    endpoint: ClassVar[str] = FLUX2_FLEX

    num_inference_steps: int | None = Field(default=None, ge=2, le=50)
    guidance_scale: float | None = Field(default=None, ge=1.5, le=10)


class Flux2FlexEditRequest(Flux2FlexRequest):
    """Input of ``fal-ai/flux-2-flex/edit``.

    :param image_urls: the reference images, 1 to 10 (URLs or ``data:`` URIs).
    """

    endpoint: ClassVar[str] = FLUX2_FLEX_EDIT

    image_size: EditImageSize = None
    image_urls: References


class Flux2DevRequest(FluxRequest):
    """Input of ``fal-ai/flux-2`` (FLUX.2 [dev]): no safety tolerance, 1 to 4 images.

    :param prompt: what to draw (or how to edit); must not be empty.
    :param image_size: a preset, or ``{"width": W, "height": H}`` from 512 to 2048 pixels.
    :param seed: makes the output reproducible for the same prompt and settings.
    :param num_images: images to generate, 1 to 4 (API default 1).
    :param num_inference_steps: denoising steps, 4 to 50 (API default 28).
    :param guidance_scale: how closely to follow the prompt, 0 to 20 (API default 2.5).
    :param acceleration: ``none``, ``regular`` (API default) or ``high``.
    :param enable_prompt_expansion: let the API expand the prompt.
    :param enable_safety_checker: let the API check the output (API default true).
    :param output_format: ``jpeg``, ``png`` (API default) or ``webp``.
    :param sync_mode: return images inline as ``data:`` URIs instead of CDN URLs.
    """

    endpoint: ClassVar[str] = FLUX2_DEV

    prompt: str = Field(min_length=1)
    image_size: DevImageSize = None
    seed: int | None = None
    num_images: int | None = Field(default=None, ge=1, le=4)
    num_inference_steps: int | None = Field(default=None, ge=4, le=50)
    guidance_scale: float | None = Field(default=None, ge=0, le=20)
    acceleration: Acceleration | None = None
    enable_prompt_expansion: bool | None = None
    enable_safety_checker: bool | None = None
    output_format: DevOutputFormat | None = None
    sync_mode: bool | None = None


class Flux2DevEditRequest(Flux2DevRequest):
    """Input of ``fal-ai/flux-2/edit``: [dev]'s fields and the references.

    :param image_urls: the reference images, 1 to 4 (fal uses the first 4 and ignores more).
    """

    endpoint: ClassVar[str] = FLUX2_DEV_EDIT

    image_urls: DevReferences


REQUEST_MODELS: dict[str, type[BaseModel]] = {
    model.endpoint: model
    for model in (
        Flux2ProRequest,
        Flux2ProEditRequest,
        Flux2FlexRequest,
        Flux2FlexEditRequest,
        Flux2MaxRequest,
        Flux2MaxEditRequest,
        Flux2DevRequest,
        Flux2DevEditRequest,
    )
}

#: fal's prices: [pro] $0.03 the first megapixel of output and $0.015 each further megapixel
#: of input and output; [max] $0.07 and $0.03 (its edit: "input images counted as processed
#: megapixel"); [flex] $0.05 a megapixel of input and output; [dev] $0.012 a megapixel (its
#: edit's inputs counted too: third-party pages only).
PRICES: dict[str, PriceRule] = {
    FLUX2_PRO: PerMegapixel(0.03, 0.015),
    FLUX2_PRO_EDIT: PerMegapixel(0.03, 0.015, counts_inputs=True),
    FLUX2_MAX: PerMegapixel(0.07, 0.03),
    FLUX2_MAX_EDIT: PerMegapixel(0.07, 0.03, counts_inputs=True),
    FLUX2_FLEX: PerMegapixel(0.05, 0.05),
    FLUX2_FLEX_EDIT: PerMegapixel(0.05, 0.05, counts_inputs=True),
    FLUX2_DEV: PerMegapixel(0.012, 0.012),
    FLUX2_DEV_EDIT: PerMegapixel(0.012, 0.012, counts_inputs=True),
}
