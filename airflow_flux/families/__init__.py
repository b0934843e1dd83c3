"""The model families, registered in one place: request models and price rules by endpoint.

Adding a family is one module here (its endpoint ids, request models and ``PRICES``), its
line in :data:`FAMILIES`, the emulator's description of it, and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_flux.families import flux2, kontext

if TYPE_CHECKING:
    from pydantic import BaseModel

    from airflow_flux.families.common import PriceRule

FAMILIES = (kontext, flux2)

#: Request models by endpoint. Endpoints not listed here take a free-form JSON object.
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    endpoint: model for family in FAMILIES for endpoint, model in family.REQUEST_MODELS.items()
}
#: One price rule by endpoint (per image, or per megapixel).
PRICES: dict[str, PriceRule] = {endpoint: rule for family in FAMILIES for endpoint, rule in family.PRICES.items()}


def price_rule(endpoint: str | None) -> PriceRule | None:
    """``endpoint``'s price rule, or None for an endpoint outside the registered families."""
    return PRICES.get((endpoint or "").strip("/"))


def one_image_per_request(endpoint: str | None) -> bool:
    """Whether ``endpoint``'s model makes one image a request (it takes no ``num_images``)."""
    model = REQUEST_MODELS.get((endpoint or "").strip("/"))
    return model is not None and "num_images" not in model.model_fields
