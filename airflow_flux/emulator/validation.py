"""Input validation for FLUX.1 Kontext [pro] text-to-image, written by hand.

:func:`validate_kontext_input` returns errors in the pydantic shape fal answers 422 with
(``loc``, ``msg``, ``type``, ``input``, ``ctx``). No aiohttp here.
"""

from __future__ import annotations

from typing import Any

from airflow_flux.emulator import images

#: The model path whose input is validated; other model paths are accepted as sent.
KONTEXT_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"


def _validation_error(
    field_name: str | None, msg: str, type_: str, value: Any, ctx: dict[str, Any] | None = None
) -> dict[str, Any]:
    loc: list[str] = ["body"] if field_name is None else ["body", field_name]
    err: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_, "input": value}
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _literal_error(name: str, value: Any, allowed: list[str]) -> dict[str, Any]:
    quoted = [f"'{a}'" for a in allowed]
    expected = ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return _validation_error(name, f"Input should be {expected}", "literal_error", value, {"expected": expected})


def validate_kontext_input(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate a FLUX.1 Kontext [pro] text-to-image body; returns pydantic-style errors."""
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
        if name in body and body[name] not in allowed:
            errors.append(_literal_error(name, body[name], allowed))
    for name in ("enhance_prompt", "sync_mode"):
        if name in body and not isinstance(body[name], bool):
            errors.append(_validation_error(name, "Input should be a valid boolean", "bool_type", body[name]))
    return errors
