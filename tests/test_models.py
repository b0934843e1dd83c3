from __future__ import annotations

import pytest

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.models import (
    KONTEXT_TEXT_TO_IMAGE,
    FluxRequestHandle,
    FluxResult,
    FluxStatus,
    KontextTextToImageRequest,
    build_payload,
)


def _error(**fields) -> FluxValidationError:
    with pytest.raises(FluxValidationError) as info:
        build_payload({"prompt": "a fox", **fields}, KONTEXT_TEXT_TO_IMAGE)
    return info.value


@pytest.mark.parametrize(
    ("fields", "field", "expected"),
    [
        ({"prompt": ""}, "prompt", "must be a non-empty string"),
        ({"prompt": "   "}, "prompt", "must be a non-empty string"),
        ({"num_images": 0}, "num_images", "must be a number from 1 to 4 (got 0)"),
        ({"num_images": 5}, "num_images", "must be a number from 1 to 4 (got 5)"),
        ({"guidance_scale": 0.5}, "guidance_scale", "must be a number from 1 to 20 (got 0.5)"),
        ({"guidance_scale": 25}, "guidance_scale", "must be a number from 1 to 20 (got 25)"),
        ({"guidance_scale": "lots"}, "guidance_scale", "must be a number from 1 to 20 (got 'lots')"),
        ({"aspect_ratio": "5:4"}, "aspect_ratio", "must be one of '21:9', '16:9', '4:3', '3:2', '1:1'"),
        ({"output_format": "gif"}, "output_format", "must be one of 'jpeg', 'png' (got 'gif')"),
        ({"safety_tolerance": "7"}, "safety_tolerance", "must be one of '1', '2', '3', '4', '5', '6' (got '7')"),
        ({"safety_tolerance": 0}, "safety_tolerance", "(got '0')"),
        ({"seed": "abc"}, "seed", "(got 'abc')"),
        ({"enhance_prompt": "maybe"}, "enhance_prompt", "(got 'maybe')"),
        ({"sync_mode": "maybe"}, "sync_mode", "(got 'maybe')"),
        ({"image_url": "http://x"}, "image_url", "unknown field for endpoint fal-ai/flux-pro/kontext/text-to-image"),
    ],
)
def test_each_field_bound_is_named_with_what_is_allowed(fields, field, expected):
    err = _error(**fields)
    assert f"{field}: " in str(err)
    assert expected in str(err)
    assert [f for f, _ in err.errors] == [field]


def test_missing_prompt_and_several_errors_are_all_reported():
    with pytest.raises(FluxValidationError) as info:
        build_payload({"num_images": 9, "aspect_ratio": "5:4"}, KONTEXT_TEXT_TO_IMAGE)
    fields = [f for f, _ in info.value.errors]
    assert fields == ["prompt", "num_images", "aspect_ratio"]
    assert "prompt: is required" in str(info.value)


def test_unknown_field_lists_the_allowed_fields():
    err = _error(strength=0.3)
    assert "allowed fields: prompt, seed, guidance_scale, num_images" in str(err)


@pytest.mark.parametrize(
    "fields",
    [
        {"num_images": 1},
        {"num_images": 4},
        {"guidance_scale": 1},
        {"guidance_scale": 20},
        {"aspect_ratio": "9:21"},
        {"output_format": "png"},
        {"safety_tolerance": "6"},
        {"seed": 42},
        {"enhance_prompt": True, "sync_mode": False},
    ],
)
def test_bounds_are_inclusive(fields):
    payload = build_payload({"prompt": "a fox", **fields}, KONTEXT_TEXT_TO_IMAGE)
    assert payload == {"prompt": "a fox", **fields}


def test_payload_sends_only_what_was_set_and_normalises_rendered_strings():
    # Templated operator fields render to strings: they must validate and be sent typed.
    payload = build_payload(
        {"prompt": " a fox ", "num_images": "2", "guidance_scale": "4.5", "safety_tolerance": 3}, KONTEXT_TEXT_TO_IMAGE
    )
    assert payload == {"prompt": "a fox", "num_images": 2, "guidance_scale": 4.5, "safety_tolerance": "3"}


def test_model_and_mapping_are_validated_the_same_way():
    model = KontextTextToImageRequest(prompt="a fox", aspect_ratio="16:9")
    assert build_payload(model, KONTEXT_TEXT_TO_IMAGE) == build_payload(
        {"prompt": "a fox", "aspect_ratio": "16:9"}, KONTEXT_TEXT_TO_IMAGE
    )


def test_other_endpoints_take_free_form_input():
    assert build_payload({"image_url": "https://x/y.png", "prompt": "p"}, "fal-ai/other/model") == {
        "image_url": "https://x/y.png",
        "prompt": "p",
    }
    with pytest.raises(FluxValidationError, match="expected a mapping"):
        build_payload(["not", "a", "mapping"], "fal-ai/other/model")  # type: ignore[arg-type]


def test_status_is_tolerant_and_knows_failed_completions():
    status = FluxStatus.model_validate(
        {
            "status": "COMPLETED",
            "request_id": "r1",
            "logs": [{"message": "done", "level": "INFO", "source": "user", "timestamp": "t", "extra": 1}],
            "metrics": {"inference_time": 1.2},
            "new_field": "kept",
        }
    )
    assert status.is_completed and not status.is_failed
    assert status.logs is not None and status.logs[0].message == "done"
    failed = FluxStatus.model_validate({"status": "COMPLETED", "error": "boom", "error_type": "internal_error"})
    assert failed.is_failed
    queued = FluxStatus.model_validate({"status": "IN_QUEUE", "queue_position": 3, "logs": None})
    assert not queued.is_completed and queued.queue_position == 3


def test_result_parses_images_and_unwraps_the_legacy_wrapper():
    body = {
        "images": [
            {"url": "https://v3.fal.media/files/a.jpg", "width": 1024, "height": 1024, "content_type": "image/jpeg"}
        ],
        "timings": {"inference": 1.22},
        "seed": 920212137,
        "has_nsfw_concepts": [False],
        "prompt": "a fox",
        "unknown": True,
    }
    result = FluxResult.model_validate(body)
    assert result.images[0].width == 1024 and result.seed == 920212137
    legacy = FluxResult.model_validate({"request_id": "r9", "response": body})
    assert legacy.images == result.images and legacy.request_id == "r9"
    assert FluxResult.model_validate({"images": [], "has_nsfw_concepts": None}).has_nsfw_concepts == []


def test_handle_from_request_id_uses_owner_and_app_only():
    handle = FluxRequestHandle.for_request_id("abc", base_url="https://api.example.com/fal/")
    assert handle.status_url == "https://api.example.com/fal/fal-ai/flux-pro/requests/abc/status"
    assert handle.response_url == "https://api.example.com/fal/fal-ai/flux-pro/requests/abc"
    assert handle.cancel_url == "https://api.example.com/fal/fal-ai/flux-pro/requests/abc/cancel"
    assert FluxRequestHandle.model_validate(handle.model_dump()) == handle
