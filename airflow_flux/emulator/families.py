"""The model families the emulator knows, by endpoint: validation, input images, output size.

A family is described in a module of its own (FLUX.1 Kontext in :mod:`.validation`, FLUX.2
in :mod:`.flux2`); other model paths are accepted as sent and render 1024x1024 images.
"""

from __future__ import annotations

import math
from typing import Any

from airflow_flux.emulator import flux2, images
from airflow_flux.emulator.validation import KONTEXT_ENDPOINTS, validate_kontext_input


def image_field(model_path: str) -> str | None:
    """The field holding ``model_path``'s input images (None: none, or an unknown endpoint)."""
    if model_path in KONTEXT_ENDPOINTS:
        return KONTEXT_ENDPOINTS[model_path]
    return flux2.FLUX2_ENDPOINTS.get(model_path)


def validate_input(model_path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """fal's 422 ``detail`` items for ``body`` (empty: valid, or an endpoint not described here)."""
    if model_path in KONTEXT_ENDPOINTS:
        return validate_kontext_input(body, KONTEXT_ENDPOINTS[model_path])
    if model_path in flux2.FLUX2_ENDPOINTS:
        return flux2.validate_flux2_input(body, model_path)
    return []


def input_image_refs(model_path: str, body: dict[str, Any]) -> list[tuple[str, list[str | int], str]]:
    """``(field label, loc, url)`` of each input image of a valid body, in order."""
    field = image_field(model_path)
    if field == "image_url":
        return [("image_url", ["body", "image_url"], body["image_url"])]
    if field == "image_urls":
        return [(f"image_urls[{i}]", ["body", "image_urls", i], url) for i, url in enumerate(body["image_urls"])]
    return []


def output_size(model_path: str, body: dict[str, Any], first_input: tuple[int, int] | None) -> tuple[int, int]:
    """Each output image's (width, height); ``first_input``: the first input image's, if loaded."""
    if model_path in flux2.FLUX2_ENDPOINTS:
        return flux2.output_size(body, first_input)
    value = body.get("aspect_ratio")
    if isinstance(value, str) and value in images.ASPECT_RATIO_SIZES:
        return images.image_size(value)
    # A Kontext edit without aspect_ratio keeps (the nearest supported ratio to) its first input's.
    if first_input is not None:
        return images.image_size(images.nearest_aspect_ratio(*first_input))
    return images.image_size("1:1")


def billable_units(model_path: str, count: int, size: tuple[int, int], inputs: list[tuple[int, int]]) -> float:
    """What a result is billed, as ``X-Fal-Billable-Units`` says it: images, or for FLUX.2 the
    megapixels (1024 x 1024 pixels, each image rounded up) of the outputs and an edit's inputs."""
    if model_path not in flux2.FLUX2_ENDPOINTS:
        return float(count)
    counted = [size] * count + (inputs if image_field(model_path) else [])
    return float(sum(max(1, math.ceil(w * h / (1024 * 1024))) for w, h in counted))
