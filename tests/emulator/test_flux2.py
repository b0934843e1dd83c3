"""The emulator's FLUX.2: sizes honoured, edits fetch every reference, billed megapixels, 422s.

Real sockets, as in test_edits: inputs come from a tiny HTTP server started there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from airflow_flux.emulator.flux2 import FLUX2_ENDPOINTS, validate_flux2_input
from airflow_flux.exceptions import FluxValidationError
from airflow_flux.models import REQUEST_MODELS, build_payload
from tests.emulator.test_edits import BLUE, RED, Origin, emu, encoded, origin, output_image, submit, submit_ok
from tests.emulator.test_emulator import result, wait_completed

if TYPE_CHECKING:
    from airflow_flux.emulator import FluxEmulator

__all__ = ["emu", "origin"]  # the fixtures, imported for this module's tests

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("model", "body", "size", "billed"),
    [
        ("fal-ai/flux-2-pro", {"image_size": "square_hd"}, (1024, 1024), 1),
        ("fal-ai/flux-2-pro", {"image_size": {"width": 2048, "height": 1536}}, (2048, 1536), 3),
        ("fal-ai/flux-2-max", {"image_size": "portrait_16_9"}, (576, 1024), 1),
        ("fal-ai/flux-2-flex", {}, (1024, 768), 1),  # fal's default: landscape_4_3
        ("fal-ai/flux-2", {"image_size": "square", "num_images": 2}, (512, 512), 2),
        ("fal-ai/flux-2-pro", {"image_size": {"width": 1000, "height": 1000}}, (992, 992), 1),  # in 16s
        ("fal-ai/flux-2-pro", {"image_size": {"width": 4096, "height": 4096}}, (2048, 2048), 4),  # scaled to 4 MP
    ],
)
def test_the_output_has_the_size_asked_for_and_the_megapixels_are_billed(
    emu: FluxEmulator, model: str, body: dict[str, Any], size: tuple[int, int], billed: int
) -> None:
    sub = submit_ok(emu, model, **body)
    if body.get("num_images", 1) == 1:
        meta, img = output_image(emu, sub)  # the served file's pixels match the result's width x height
        assert (meta["width"], meta["height"]) == size == img.size
    wait_completed(emu, sub)
    res = result(emu, sub)
    assert {(i["width"], i["height"]) for i in res.json()["images"]} == {size}
    assert res.headers["X-Fal-Billable-Units"] == str(billed)


def test_an_edit_fetches_every_reference_without_credentials_and_bills_them(emu: FluxEmulator, origin: Origin) -> None:
    refs = [origin.serve("/a.png", encoded(RED, (640, 480))), origin.serve("/b.png", encoded(BLUE, (2048, 1024)))]
    sub = submit_ok(emu, "fal-ai/flux-2-pro/edit", image_urls=refs, image_size="square_hd")
    meta, _ = output_image(emu, sub)
    job = emu.jobs[sub["request_id"]]
    assert [f.url for f in job.input_fetches] == refs and all(f.ok for f in job.input_fetches)
    assert not any(f.authorization_sent for f in job.input_fetches)
    assert (meta["width"], meta["height"]) == (1024, 1024)
    # 1 MP out + 1 MP (640x480, rounded up) + 2 MP (2048x1024) in.
    assert result(emu, sub).headers["X-Fal-Billable-Units"] == "4"


def test_an_edit_asking_auto_follows_its_first_reference(emu: FluxEmulator, origin: Origin) -> None:
    ref = origin.serve("/wide.png", encoded(RED, (1600, 900)))
    meta, _ = output_image(emu, submit_ok(emu, "fal-ai/flux-2-flex/edit", image_urls=[ref], image_size="auto"))
    assert (meta["width"], meta["height"]) == (1600, 896)  # in 16s


@pytest.mark.parametrize(
    ("model", "body", "loc"),
    [
        ("fal-ai/flux-2-pro", {"image_size": "huge"}, ["body", "image_size"]),
        ("fal-ai/flux-2-pro", {"image_size": {"width": 0, "height": 1024}}, ["body", "image_size", "width"]),
        ("fal-ai/flux-2", {"image_size": {"width": 1024, "height": 256}}, ["body", "image_size", "height"]),
        ("fal-ai/flux-2", {"safety_tolerance": "2"}, ["body", "safety_tolerance"]),
        ("fal-ai/flux-2-pro", {"num_images": 2}, ["body", "num_images"]),
        ("fal-ai/flux-2-pro", {"safety_tolerance": "6"}, ["body", "safety_tolerance"]),
        ("fal-ai/flux-2-pro/edit", {"image_urls": ["https://x.invalid/a.png"] * 11}, ["body", "image_urls"]),
        ("fal-ai/flux-2/edit", {"image_urls": ["https://x.invalid/a.png"] * 5}, ["body", "image_urls"]),
        ("fal-ai/flux-2-pro/edit", {}, ["body", "image_urls"]),
    ],
)
def test_a_bad_body_is_refused_with_422_naming_the_field(
    emu: FluxEmulator, model: str, body: dict[str, Any], loc: list[str]
) -> None:
    resp = submit(emu, model, **body)
    assert resp.status_code == 422, resp.text
    assert loc in [e["loc"] for e in resp.json()["detail"]]
    assert emu.jobs == {}


BODIES: list[dict[str, Any]] = [
    {"image_size": "square"},
    {"image_size": "auto"},
    {"image_size": {"width": 1024, "height": 1024}},
    {"image_size": {"width": 1000, "height": 1024}},
    {"image_size": {"width": 4096, "height": 4096}},
    {"image_size": {"width": 0, "height": 1024}},
    {"image_size": {"width": 256, "height": 1024}},
    {"image_size": {"width": 1024, "height": 1024, "depth": 1}},
    {"acceleration": "high"},
    {"guidance_scale": 1},
    {"num_inference_steps": 3},
    {"num_images": 1},
    {"num_images": 4},
    {"safety_tolerance": "5"},
    {"safety_tolerance": "6"},
    {"output_format": "webp"},
    {"enable_safety_checker": False},
    {"image_urls": ["https://x.invalid/a.png"]},
    {"image_urls": ["https://x.invalid/a.png"] * 5},
    {"image_urls": ["https://x.invalid/a.png"] * 11},
]


@pytest.mark.parametrize("model", sorted(FLUX2_ENDPOINTS))
def test_the_emulator_and_the_provider_agree_on_what_is_valid(model: str) -> None:
    # Written independently (hand-written checks, pydantic models): the same verdicts. The
    # provider is stricter in one way only: it refuses unknown fields the API would ignore.
    edit = FLUX2_ENDPOINTS[model] is not None
    for body in BODIES:
        full = {"prompt": "a bottle", **body}
        if edit and "image_urls" not in full:
            full["image_urls"] = ["https://x.invalid/ref.png"]
        if not edit and "image_urls" in full:
            continue
        try:
            build_payload(full, model)
            provider_ok = True
        except FluxValidationError:
            provider_ok = False
        if set(full) - set(REQUEST_MODELS[model].model_fields):
            assert not provider_ok, (model, body)  # a field the model does not take: refused, not ignored
            continue
        assert (validate_flux2_input(full, model) == []) == provider_ok, (model, body)
