"""What every model family shares: request field types, the request base, the price rules.

A family module (:mod:`~airflow_flux.families.kontext`, :mod:`~airflow_flux.families.flux2`)
declares its endpoints' request models and one price rule per endpoint with these; the
registry (:mod:`airflow_flux.families`) gathers them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

OutputFormat = Literal["jpeg", "png"]
OUTPUT_FORMATS: tuple[str, ...] = ("jpeg", "png")

#: One megapixel as fal counts it for pricing: 1024 x 1024 pixels (a 1024x1024 image is 1 MP,
#: 1920x1080 is 2; each image rounded up on its own).
MEGAPIXEL = 1024 * 1024


def tolerance_to_str(value: Any) -> Any:
    """``safety_tolerance`` as fal wants it (``"2"``); users naturally write ``2``.

    bool is an int subclass and is left alone so it fails validation.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class FluxRequest(BaseModel):
    """Base of every typed request: strict (unknown fields refused), built on first use.

    ``endpoint`` is the fal model path the model describes.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True, defer_build=True)

    endpoint: ClassVar[str]

    def to_payload(self) -> dict[str, Any]:
        """The JSON body to send: only what the user set, so the API's own defaults apply."""
        return self.model_dump(exclude_none=True)


def megapixels(width: int, height: int) -> int:
    """``width`` x ``height`` in billed megapixels: rounded up, at least 1."""
    return max(1, math.ceil(width * height / MEGAPIXEL))


@dataclass(frozen=True)
class Prices:
    """A connection's own prices (an aggregator's), overriding the published ones.

    :param per_image: US dollars per image, for endpoints priced per image.
    :param per_megapixel: US dollars per megapixel, for endpoints priced per megapixel (every
        megapixel at this price: aggregators quote one figure).
    """

    per_image: float | None = None
    per_megapixel: float | None = None


NO_OVERRIDE = Prices()
#: An image's size, as the result gives it (either may be missing).
Size = tuple[int | None, int | None]


@dataclass(frozen=True)
class PerImage:
    """A flat price per generated image (FLUX.1 Kontext)."""

    usd: float

    def cost(
        self,
        outputs: Sequence[Size],
        inputs: Iterable[Size] | None = None,
        prices: Prices = NO_OVERRIDE,
        billable_units: float | None = None,
    ) -> float | None:
        """What ``outputs`` cost; the inputs do not count."""
        if prices.per_megapixel is not None and prices.per_image is None:
            return None  # a connection priced per megapixel, for an endpoint priced per image: unknown
        price = prices.per_image if prices.per_image is not None else self.usd
        return round(price * len(outputs), 6)


@dataclass(frozen=True)
class PerMegapixel:
    """A price per megapixel, each image rounded up on its own (FLUX.2).

    :param first: US dollars for a request's first megapixel.
    :param extra: for each further megapixel of the request.
    :param counts_inputs: the input images' megapixels are billed too (edits; flex counts
        input and output alike).
    """

    first: float
    extra: float
    counts_inputs: bool = False

    def cost(
        self,
        outputs: Sequence[Size],
        inputs: Iterable[Size] | None = None,
        prices: Prices = NO_OVERRIDE,
        billable_units: float | None = None,
    ) -> float | None:
        """What a request with these output (and input) images costs.

        :param inputs: the input images' sizes (None: not known).
        :param billable_units: the megapixels fal says it billed; they win over the sizes.
        :returns: None when it cannot be known: a size missing, or an edit's inputs not known
            and fal not saying what it billed.
        """
        if prices.per_image is not None and prices.per_megapixel is None:
            return None  # a connection priced per image, for an endpoint priced per megapixel: unknown
        if not outputs:
            return 0.0
        if billable_units is not None:
            total = max(1, math.ceil(billable_units))
        else:
            if self.counts_inputs and inputs is None:
                return None
            sizes = [*outputs, *((inputs or ()) if self.counts_inputs else ())]
            if any(w is None or h is None for w, h in sizes):
                return None
            total = sum(megapixels(int(w or 0), int(h or 0)) for w, h in sizes)
        if prices.per_megapixel is not None:
            return round(prices.per_megapixel * total, 6)
        return round(self.first + self.extra * (total - 1), 6)


PriceRule = PerImage | PerMegapixel
