"""FLUX.2's request models and price rules (airflow_flux/families), one function at a time."""

from __future__ import annotations

import pytest

from airflow_flux import families, models
from airflow_flux.exceptions import FluxValidationError
from airflow_flux.families import flux2, kontext
from airflow_flux.families.common import PerImage, PerMegapixel, Prices
from airflow_flux.families.flux2 import (
    FLUX2_DEV,
    FLUX2_DEV_EDIT,
    FLUX2_FLEX,
    FLUX2_FLEX_EDIT,
    FLUX2_MAX,
    FLUX2_PRO,
    FLUX2_PRO_EDIT,
)
from airflow_flux.models import build_payload, cost_usd

REFS = ["s3://shop/a.png", "s3://shop/b.png"]


@pytest.mark.parametrize(
    "image_size", ["square_hd", "landscape_16_9", {"width": 2048, "height": 2048}, {"width": 1920, "height": 1088}]
)
def test_a_pro_request_carries_image_size_as_given_and_no_kontext_field(image_size):
    payload = build_payload({"prompt": "a bottle", "image_size": image_size, "seed": 3}, FLUX2_PRO)
    assert payload == {"prompt": "a bottle", "image_size": image_size, "seed": 3}


@pytest.mark.parametrize(
    ("endpoint", "fields", "message"),
    [
        (FLUX2_PRO, {"image_size": "huge"}, r"image_size: must be one of 'square_hd', .* \(got 'huge'\)"),
        (FLUX2_PRO, {"image_size": "auto"}, r"image_size: must be one of .*\(got 'auto'\)"),  # edits only
        (FLUX2_PRO, {"image_size": {"width": 0, "height": 1024}}, r"image_size: .*whole numbers from 1 to 14142"),
        (FLUX2_PRO, {"image_size": {"width": 20000, "height": 1024}}, r"image_size: .*from 1 to 14142"),
        (FLUX2_PRO, {"image_size": {"width": 1024}}, r"image_size: must be"),
        (FLUX2_PRO, {"image_size": {"width": 1024, "height": 1024, "depth": 3}}, r"image_size: must be"),
        (FLUX2_PRO, {"image_size": {"width": True, "height": 1024}}, r"image_size: must be"),
        (FLUX2_DEV, {"image_size": {"width": 256, "height": 1024}}, r"image_size: .*from 512 to 2048"),
        (FLUX2_DEV_EDIT, {"image_urls": REFS, "image_size": "auto"}, r"image_size: must be one of"),
        (FLUX2_PRO, {"num_images": 2}, r"num_images: fal-ai/flux-2-pro makes one image a request"),
        (FLUX2_MAX, {"num_images": 1}, r"num_images: fal-ai/flux-2-max makes one image a request"),
        (FLUX2_PRO, {"aspect_ratio": "1:1"}, r"aspect_ratio: unknown field for endpoint fal-ai/flux-2-pro"),
        (FLUX2_PRO, {"guidance_scale": 3}, r"guidance_scale: unknown field"),
        (FLUX2_PRO, {"safety_tolerance": 6}, r"safety_tolerance: must be one of '1', '2', '3', '4', '5' \(got '6'\)"),
        (FLUX2_PRO_EDIT, {"image_urls": REFS * 6}, r"image_urls: must be a list of 1 to 10 image URLs"),
        (FLUX2_PRO_EDIT, {"image_urls": []}, r"image_urls: must be a list of 1 to 10"),
        (FLUX2_DEV_EDIT, {"image_urls": REFS * 3}, r"image_urls: must be a list of 1 to 4"),
        (FLUX2_FLEX, {"enable_prompt_expansion": True}, r"enable_prompt_expansion: unknown field"),
        (FLUX2_FLEX, {"num_images": 2}, r"num_images: fal-ai/flux-2-flex makes one image a request"),
        (FLUX2_DEV, {"safety_tolerance": "2"}, r"safety_tolerance: unknown field for endpoint fal-ai/flux-2;"),
        (FLUX2_DEV, {"acceleration": "max"}, r"acceleration: must be one of 'none', 'regular', 'high'"),
        (FLUX2_PRO_EDIT, {}, r"image_urls: is required"),
        (FLUX2_FLEX, {"num_inference_steps": 1}, r"num_inference_steps: must be a number from 2 to 50 \(got 1\)"),
        (FLUX2_DEV, {"num_images": 5}, r"num_images: must be a number from 1 to 4 \(got 5\)"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_what_is_allowed(endpoint, fields, message):
    with pytest.raises(FluxValidationError, match=message):
        build_payload({"prompt": "a bottle", **fields}, endpoint)


def test_an_edit_takes_its_references_and_may_ask_auto():
    payload = build_payload({"prompt": "on marble", "image_urls": REFS, "image_size": "auto"}, FLUX2_PRO_EDIT)
    assert payload == {"prompt": "on marble", "image_urls": REFS, "image_size": "auto"}
    flex = build_payload({"prompt": "x", "image_urls": REFS[:1], "guidance_scale": 4.5}, FLUX2_FLEX_EDIT)
    assert flex["guidance_scale"] == 4.5


@pytest.mark.parametrize(
    ("endpoint", "sizes", "expected"),
    [
        (FLUX2_PRO, [(1024, 1024)], 0.03),  # 1 MP: the first megapixel only
        (FLUX2_PRO, [(2048, 2048)], 0.03 + 3 * 0.015),  # 4 MP
        (FLUX2_PRO, [(1025, 1024)], 0.045),  # rounded up per image: 2 MP
        (FLUX2_MAX, [(1024, 1024)], 0.07),
        (FLUX2_MAX, [(1920, 1088)], 0.10),  # 2 MP
        (FLUX2_FLEX, [(1920, 1080)], 0.10),  # fal's own example: 2 MP at $0.05
        (FLUX2_FLEX, [(512, 512)], 0.05),  # fal's own example: rounded up to 1 MP
        (FLUX2_DEV, [(1024, 1024)] * 3, 3 * 0.012),
    ],
)
def test_flux2_costs_by_the_megapixels_of_the_real_output(endpoint, sizes, expected):
    images = [{"width": w, "height": h} for w, h in sizes]
    assert cost_usd(endpoint, images) == pytest.approx(expected)


def test_a_larger_image_costs_more_and_an_unknown_size_or_input_is_not_guessed():
    small = cost_usd(FLUX2_PRO, [{"width": 1024, "height": 1024}])
    large = cost_usd(FLUX2_PRO, [{"width": 2048, "height": 2048}])
    assert small is not None and large is not None and large > small
    assert cost_usd(FLUX2_PRO, [{"url": "x"}]) is None  # no width/height in the result
    assert cost_usd(FLUX2_PRO, 1) is None
    # An edit bills its inputs' megapixels too: unknown sizes are not guessed...
    assert cost_usd(FLUX2_PRO_EDIT, [{"width": 1024, "height": 1024}]) is None
    # ...but what fal says it billed is used, and known input sizes count.
    assert cost_usd(FLUX2_PRO_EDIT, [{"width": 1024, "height": 1024}], billable_units=3) == pytest.approx(0.06)
    assert cost_usd(FLUX2_PRO_EDIT, [{"width": 1024, "height": 1024}], inputs=[(64, 48), (2048, 1024)]) == (
        pytest.approx(0.03 + 3 * 0.015)
    )


def test_a_connection_overrides_prices_in_the_endpoints_own_unit():
    one_mp = [{"width": 1024, "height": 1024}]
    assert cost_usd(FLUX2_PRO, [{"width": 2048, "height": 1024}], prices=Prices(per_megapixel=0.02)) == 0.04
    # A price per image says nothing of a megapixel price, and the other way round: unknown.
    assert cost_usd(FLUX2_PRO, one_mp, prices=Prices(per_image=0.05)) is None
    assert cost_usd(kontext.KONTEXT_EDIT, 2, prices=Prices(per_megapixel=0.02)) is None
    assert cost_usd(kontext.KONTEXT_EDIT, 2, prices=Prices(per_image=0.05)) == 0.10
    assert cost_usd(kontext.KONTEXT_MAX_EDIT, 2) == 0.16
    # An endpoint outside the families: only the connection's price says anything.
    assert cost_usd("fal-ai/other", one_mp) is None
    assert cost_usd("fal-ai/other", one_mp, prices=Prices(per_megapixel=0.02)) == 0.02
    assert cost_usd("fal-ai/other", 3, prices=Prices(per_image=0.01)) == 0.03


def test_every_endpoint_is_registered_once_with_its_model_and_its_price_rule():
    for family in families.FAMILIES:
        assert set(family.REQUEST_MODELS) == set(family.PRICES), family.__name__
        for endpoint, model in family.REQUEST_MODELS.items():
            assert model.endpoint == endpoint
            assert families.REQUEST_MODELS[endpoint] is model
            assert families.price_rule(endpoint) is family.PRICES[endpoint]
    assert len(families.REQUEST_MODELS) == sum(len(f.REQUEST_MODELS) for f in families.FAMILIES)
    assert all(isinstance(r, PerImage) for r in kontext.PRICES.values())
    assert all(isinstance(r, PerMegapixel) for r in flux2.PRICES.values())
    # Kontext moved into the same shape; its public import paths keep working.
    assert models.KontextEditRequest is kontext.KontextEditRequest
    assert models.KONTEXT_TEXT_TO_IMAGE == kontext.KONTEXT_TEXT_TO_IMAGE
    assert models.REQUEST_MODELS is families.REQUEST_MODELS
