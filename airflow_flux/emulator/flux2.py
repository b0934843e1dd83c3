"""The emulator's description of FLUX.2 on fal: endpoints, input validation, output size.

Written by hand from fal's model pages, independently of the provider's pydantic models (a
test that both agree then means something). Errors are in the pydantic shape fal answers
422 with. The output size follows ``image_size`` (a preset or ``{"width", "height"}``, whole numbers
up to 14142, [dev]'s from 512 to 2048); an edit asked ``auto`` (or no size) follows its
first input, within 4 MP as fal resizes; text-to-image defaults to ``landscape_4_3``.
"""

from __future__ import annotations

from typing import Any

from airflow_flux.emulator.validation import (
    _image_errors,
    _is_int,
    _is_number,
    _literal_error,
    _validation_error,
    prompt_errors,
)

#: The model paths and the field holding their input images (None: text-to-image).
FLUX2_ENDPOINTS: dict[str, str | None] = {
    "fal-ai/flux-2-pro": None,
    "fal-ai/flux-2-pro/edit": "image_urls",
    "fal-ai/flux-2-flex": None,
    "fal-ai/flux-2-flex/edit": "image_urls",
    "fal-ai/flux-2-max": None,
    "fal-ai/flux-2-max/edit": "image_urls",
    "fal-ai/flux-2": None,
    "fal-ai/flux-2/edit": "image_urls",
}
_DEV = "fal-ai/flux-2"
_FLEX = "fal-ai/flux-2-flex"
PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
SIDES, DEV_SIDES = (1, 14142), (512, 2048)
MAX_PIXELS = 4 * 1024 * 1024
MAX_REFERENCES, DEV_MAX_REFERENCES = 10, 4


def _base(model_path: str) -> str:
    return model_path.removesuffix("/edit")


def _size_errors(value: Any, *, edit: bool, sides: tuple[int, int]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        allowed = [*PRESETS, *(["auto"] if edit else [])]
        return [] if value in allowed else [_literal_error("image_size", value, allowed)]
    if not isinstance(value, dict):
        return [_validation_error("image_size", "Input should be a valid dictionary or enum", "model_type", value)]
    errors = []
    for side in ("width", "height"):
        got = value.get(side)
        if not (isinstance(got, int) and not isinstance(got, bool) and sides[0] <= got <= sides[1]):
            msg = f"Input should be an integer from {sides[0]} to {sides[1]}"
            errors.append({"loc": ["body", "image_size", side], "msg": msg, "type": "int_range", "input": got})
    for extra in sorted(set(value) - {"width", "height"}):
        msg = "Extra inputs are not permitted"
        errors.append(
            {"loc": ["body", "image_size", extra], "msg": msg, "type": "extra_forbidden", "input": value[extra]}
        )
    return errors


def validate_flux2_input(body: dict[str, Any], model_path: str) -> list[dict[str, Any]]:
    """Validate a FLUX.2 body for ``model_path``; returns pydantic-style errors."""
    image_field = FLUX2_ENDPOINTS[model_path]
    base = _base(model_path)
    dev = base == _DEV
    errors = prompt_errors(body)
    allowed = {"prompt", "image_size", "seed", "enable_safety_checker", "output_format", "sync_mode"}
    if image_field:
        allowed.add(image_field)
    if base == _FLEX:
        allowed |= {"num_inference_steps", "guidance_scale"}
    if dev:
        allowed |= {"num_inference_steps", "guidance_scale", "num_images", "acceleration", "enable_prompt_expansion"}
    else:
        allowed.add("safety_tolerance")
    # fal's schemas do not forbid extra fields, but one that another model takes (num_images on
    # [pro]) must not look accepted: it would be ignored, and the caller would get one image.
    for name in sorted(set(body) - allowed):
        if name in ("num_images", "aspect_ratio", "safety_tolerance", "guidance_scale", "num_inference_steps"):
            errors.append(_validation_error(name, "Extra inputs are not permitted", "extra_forbidden", body[name]))
    if body.get("image_size") is not None:
        edit = image_field is not None and not dev
        errors += _size_errors(body["image_size"], edit=edit, sides=DEV_SIDES if dev else SIDES)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        errors.append(_validation_error("seed", "Input should be a valid integer", "int_type", seed))
    literals = [("output_format", ["jpeg", "png", "webp"] if dev else ["jpeg", "png"])]
    literals += (
        [("acceleration", ["none", "regular", "high"])] if dev else [("safety_tolerance", ["1", "2", "3", "4", "5"])]
    )
    for name, values in literals:
        if name in body and body[name] not in values:
            errors.append(_literal_error(name, body[name], values))
    for name in ("enable_safety_checker", "sync_mode", "enable_prompt_expansion"):
        if name in body and name in allowed and not isinstance(body[name], bool):
            errors.append(_validation_error(name, "Input should be a valid boolean", "bool_type", body[name]))
    ranges = {
        "num_images": (1, 4),
        "num_inference_steps": (4, 50) if dev else (2, 50),
        "guidance_scale": (0, 20) if dev else (1.5, 10),
    }
    for name, (low, high) in ranges.items():
        if name not in body or name not in allowed:
            continue
        value = body[name]
        whole = name != "guidance_scale"
        if not (_is_int(value) if whole else _is_number(value)) or not low <= value <= high:
            errors.append(_validation_error(name, f"Input should be from {low:g} to {high:g}", "range", value))
    if image_field:
        errors += _image_errors(body, image_field)
        urls, most = body.get(image_field), DEV_MAX_REFERENCES if dev else MAX_REFERENCES
        if isinstance(urls, list) and len(urls) > most:
            errors.append(
                _validation_error(
                    image_field,
                    f"List should have at most {most} items after validation, not {len(urls)}",
                    "too_long",
                    urls,
                    {"field_type": "List", "max_length": most, "actual_length": len(urls)},
                )
            )
    return errors


def output_size(body: dict[str, Any], first_input: tuple[int, int] | None) -> tuple[int, int]:
    """The size of each output image of a valid body (``first_input``: its first input's size).

    As FLUX.2 makes them: in multiples of 16 pixels, at most 4 MP (a larger ask is scaled down).
    """
    value = body.get("image_size")
    if isinstance(value, dict):
        width, height = int(value["width"]), int(value["height"])
    elif isinstance(value, str) and value in PRESETS:
        width, height = PRESETS[value]
    elif first_input is not None:  # auto (an edit's default): the input's size
        width, height = first_input
    else:
        width, height = PRESETS["landscape_4_3"]
    scale = min(1.0, (MAX_PIXELS / (width * height)) ** 0.5)
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)
