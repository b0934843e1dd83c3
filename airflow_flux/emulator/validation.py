"""Input validation for the FLUX.1 Kontext family, written by hand.

:func:`validate_kontext_input` returns errors in the pydantic shape fal answers 422 with
(``loc``, ``msg``, ``type``, ``input``, ``ctx``); :func:`validate_request_headers` does the
same for fal's request headers (``X-Fal-Request-Timeout``, ``X-Fal-Queue-Priority``).
:data:`KONTEXT_ENDPOINTS` lists the validated model paths and the field holding their input
images. Fields outside the schema are ignored, as before (not rejected). No aiohttp here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from airflow_flux.emulator import images

if TYPE_CHECKING:
    from collections.abc import Mapping

KONTEXT_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
KONTEXT_EDIT = "fal-ai/flux-pro/kontext"
KONTEXT_MULTI = "fal-ai/flux-pro/kontext/multi"
KONTEXT_MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
KONTEXT_MAX_EDIT = "fal-ai/flux-pro/kontext/max"
KONTEXT_MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"

#: The validated model paths and the field holding their input images: None (text-to-image),
#: ``"image_url"`` (one image, an edit) or ``"image_urls"`` (a list, multi). Other model
#: paths are accepted as sent.
KONTEXT_ENDPOINTS: dict[str, str | None] = {
    KONTEXT_TEXT_TO_IMAGE: None,
    KONTEXT_MAX_TEXT_TO_IMAGE: None,
    KONTEXT_EDIT: "image_url",
    KONTEXT_MAX_EDIT: "image_url",
    KONTEXT_MULTI: "image_urls",
    KONTEXT_MAX_MULTI: "image_urls",
}

QUEUE_PRIORITIES = ("normal", "low")
#: fal's clients refuse a start timeout of 1 s or less; so does the emulator.
MIN_REQUEST_TIMEOUT = 1.0


def _validation_error(
    field_name: str | None,
    msg: str,
    type_: str,
    value: Any,
    ctx: dict[str, Any] | None = None,
    *,
    index: int | None = None,
    where: str = "body",
) -> dict[str, Any]:
    loc: list[str | int] = [where] if field_name is None else [where, field_name]
    if index is not None:
        loc.append(index)
    err: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_, "input": value}
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _literal_error(name: str, value: Any, allowed: list[str] | tuple[str, ...], where: str = "body") -> dict[str, Any]:
    quoted = [f"'{a}'" for a in allowed]
    expected = ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return _validation_error(
        name, f"Input should be {expected}", "literal_error", value, {"expected": expected}, where=where
    )


def _image_errors(body: dict[str, Any], image_field: str) -> list[dict[str, Any]]:
    """Errors of ``image_url`` (a string) or ``image_urls`` (a non-empty list of strings)."""
    if image_field not in body:
        return [_validation_error(image_field, "Field required", "missing", body)]
    value = body[image_field]
    if image_field == "image_url":
        if not isinstance(value, str):
            return [_validation_error(image_field, "Input should be a valid string", "string_type", value)]
        return []
    if not isinstance(value, list):
        return [_validation_error(image_field, "Input should be a valid list", "list_type", value)]
    if not value:
        return [
            _validation_error(
                image_field,
                "List should have at least 1 item after validation, not 0",
                "too_short",
                value,
                {"field_type": "List", "min_length": 1, "actual_length": 0},
            )
        ]
    return [
        _validation_error(image_field, "Input should be a valid string", "string_type", item, index=i)
        for i, item in enumerate(value)
        if not isinstance(item, str)
    ]


def prompt_errors(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Errors of ``prompt``: required, a string, not blank (every family's)."""
    errors: list[dict[str, Any]] = []
    if "prompt" not in body:
        errors.append(_validation_error("prompt", "Field required", "missing", body))
    elif not isinstance(body["prompt"], str):
        errors.append(_validation_error("prompt", "Input should be a valid string", "string_type", body["prompt"]))
    elif not body["prompt"].strip():
        errors.append(
            _validation_error(
                "prompt",
                "String should have at least 1 character",
                "string_too_short",
                body["prompt"],
                {"min_length": 1},
            )
        )
    return errors


def validate_kontext_input(body: dict[str, Any], image_field: str | None = None) -> list[dict[str, Any]]:
    """Validate a FLUX.1 Kontext body; returns pydantic-style errors.

    ``image_field`` is the endpoint's input-image field (see :data:`KONTEXT_ENDPOINTS`):
    None validates text-to-image; with one, ``aspect_ratio`` may also be null (no default:
    the output keeps the input's aspect ratio).
    """
    errors = prompt_errors(body)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        errors.append(_validation_error("seed", "Input should be a valid integer", "int_type", seed))
    ranges: list[tuple[str, bool, float, float]] = [
        ("guidance_scale", False, 1, 20),
        ("num_images", True, 1, 4),
    ]
    for name, integer, low, high in ranges:
        if name not in body:
            continue
        value = body[name]
        if integer and not _is_int(value):
            errors.append(_validation_error(name, "Input should be a valid integer", "int_type", value))
        elif not integer and not _is_number(value):
            errors.append(_validation_error(name, "Input should be a valid number", "float_type", value))
        elif value < low:
            errors.append(
                _validation_error(
                    name,
                    f"Input should be greater than or equal to {low:g}",
                    "greater_than_equal",
                    value,
                    {"ge": low},
                )
            )
        elif value > high:
            errors.append(
                _validation_error(
                    name,
                    f"Input should be less than or equal to {high:g}",
                    "less_than_equal",
                    value,
                    {"le": high},
                )
            )
    literals: list[tuple[str, list[str]]] = [
        ("output_format", list(images.OUTPUT_FORMATS)),
        ("safety_tolerance", ["1", "2", "3", "4", "5", "6"]),
        ("aspect_ratio", list(images.ASPECT_RATIO_SIZES)),
    ]
    for name, allowed in literals:
        if name == "aspect_ratio" and image_field is not None and body.get(name, "") is None:
            continue
        if name in body and body[name] not in allowed:
            errors.append(_literal_error(name, body[name], allowed))
    for name in ("enhance_prompt", "sync_mode"):
        if name in body and not isinstance(body[name], bool):
            errors.append(_validation_error(name, "Input should be a valid boolean", "bool_type", body[name]))
    if image_field is not None:
        errors.extend(_image_errors(body, image_field))
    return errors


def validate_request_headers(headers: Mapping[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """fal's request options from the submit's headers, and pydantic-style errors.

    The options: ``request_timeout`` (float seconds or None), ``priority`` (``"normal"``
    unless sent), ``store_io`` and ``object_lifecycle_preference`` (the raw header values or
    None). Errors name the header as ``["header", "<lower-case name>"]``.
    """
    errors: list[dict[str, Any]] = []
    seconds: float | None = None
    raw_timeout = headers.get("X-Fal-Request-Timeout")
    if raw_timeout is not None:
        try:
            seconds = float(raw_timeout.strip())
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= MIN_REQUEST_TIMEOUT:
            errors.append(
                _validation_error(
                    "x-fal-request-timeout",
                    f"X-Fal-Request-Timeout must be a number of seconds greater than {MIN_REQUEST_TIMEOUT:g}",
                    "value_error",
                    raw_timeout,
                    {"gt": MIN_REQUEST_TIMEOUT},
                    where="header",
                )
            )
            seconds = None
    priority = headers.get("X-Fal-Queue-Priority")
    if priority is not None and priority not in QUEUE_PRIORITIES:
        errors.append(_literal_error("x-fal-queue-priority", priority, QUEUE_PRIORITIES, where="header"))
        priority = None
    options = {
        "request_timeout": seconds,
        "priority": priority or "normal",
        "store_io": headers.get("X-Fal-Store-IO"),
        "object_lifecycle_preference": headers.get("X-Fal-Object-Lifecycle-Preference"),
    }
    return options, errors
