"""Pydantic models of the queue status, the request handle and the result, and the request
validation every endpoint goes through (the request models themselves are each model
family's, in :mod:`airflow_flux.families`; the Kontext ones are importable from here too).

Requests are strict (a bad value fails before anything is paid for, with a message that
names the field and what is allowed); responses are tolerant (unknown fields are kept,
fal's legacy ``{"response": {...}}`` wrapper is unwrapped) because the API grows fields
over time and a new field must never fail a paid generation.

Every model is ``defer_build``: its validator is built on first use, not on import. DAG
files import this module through the operators, and the DAG processor imports
``airflow_flux`` again for every parse (it pre-imports ``airflow.*`` modules only); building
every validator was most of this import's cost (``bench/RESULTS.md``, parse cost). A parse
builds the request model only (to validate the values known at parse time); the others are
built by the worker or triggerer that uses them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.families import REQUEST_MODELS as REQUEST_MODELS
from airflow_flux.families import price_rule
from airflow_flux.families.common import NO_OVERRIDE, PerImage, PerMegapixel, Prices, Size
from airflow_flux.families.common import OUTPUT_FORMATS as OUTPUT_FORMATS
from airflow_flux.families.common import OutputFormat as OutputFormat
from airflow_flux.families.kontext import ASPECT_RATIOS as ASPECT_RATIOS
from airflow_flux.families.kontext import KONTEXT_EDIT as KONTEXT_EDIT
from airflow_flux.families.kontext import KONTEXT_MAX_EDIT as KONTEXT_MAX_EDIT
from airflow_flux.families.kontext import KONTEXT_MAX_MULTI as KONTEXT_MAX_MULTI
from airflow_flux.families.kontext import KONTEXT_MAX_TEXT_TO_IMAGE as KONTEXT_MAX_TEXT_TO_IMAGE
from airflow_flux.families.kontext import KONTEXT_MULTI as KONTEXT_MULTI
from airflow_flux.families.kontext import KONTEXT_TEXT_TO_IMAGE as KONTEXT_TEXT_TO_IMAGE
from airflow_flux.families.kontext import AspectRatio as AspectRatio
from airflow_flux.families.kontext import KontextEditRequest as KontextEditRequest
from airflow_flux.families.kontext import KontextMaxEditRequest as KontextMaxEditRequest
from airflow_flux.families.kontext import KontextMaxMultiRequest as KontextMaxMultiRequest
from airflow_flux.families.kontext import KontextMaxTextToImageRequest as KontextMaxTextToImageRequest
from airflow_flux.families.kontext import KontextMultiRequest as KontextMultiRequest
from airflow_flux.families.kontext import KontextTextToImageRequest as KontextTextToImageRequest
from airflow_flux.redact import redact_presigned

#: Request fields that carry input images (the caller's URIs; see ``operators.inputs``).
IMAGE_INPUT_FIELDS: tuple[str, ...] = ("image_url", "image_urls")


def _size(image: Any) -> Size:
    get = image.get if isinstance(image, Mapping) else lambda name: getattr(image, name, None)
    width, height = get("width"), get("height")
    return (width if isinstance(width, int) else None, height if isinstance(height, int) else None)


def cost_usd(
    endpoint: str | None,
    images: Sequence[Any] | int,
    *,
    inputs: Iterable[Size] | None = None,
    billable_units: float | None = None,
    prices: Prices = NO_OVERRIDE,
) -> float | None:
    """What one request's ``images`` cost, by its endpoint's price rule (or the connection's prices).

    :param images: the result's images (each with its ``width`` and ``height``), or their number.
    :param inputs: the input images' sizes, for endpoints that bill them (None: not known).
    :param billable_units: what fal said it billed (``X-Fal-Billable-Units``), when it did.
    :param prices: the connection's own prices (an aggregator's), overriding the published ones.
    :returns: None when it cannot be known: an endpoint with no published price and no price
        on the connection, or a size a per-megapixel price needs missing from the result.
    """
    outputs = [(None, None)] * images if isinstance(images, int) else [_size(i) for i in images]
    rule = price_rule(endpoint)
    if rule is not None:
        return rule.cost(outputs, inputs, prices, billable_units)
    # Outside the registered families: the connection's price, if it says one.
    if prices.per_image is not None:
        return PerImage(prices.per_image).cost(outputs)
    if prices.per_megapixel is not None:
        return PerMegapixel(prices.per_megapixel, prices.per_megapixel).cost(outputs, (), prices, billable_units)
    return None


# Status values of fal's queue. There is deliberately no FAILED: a failed request ends
# COMPLETED, with ``error``/``error_type`` in the status or an error on the result.
IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"


def _literal_values(annotation: Any) -> list[Any]:
    """The values of the ``Literal`` types in an annotation (``Literal[...] | None``, ``Annotated``)."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def _allowed_values(model: type[BaseModel], field: str) -> str | None:
    """Describe what a field accepts, from the model's own constraints (one source of truth)."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    lo = hi = None
    for meta in info.metadata:
        if isinstance(meta, Ge | Gt):
            lo = meta.ge if isinstance(meta, Ge) else meta.gt
        elif isinstance(meta, Le | Lt):
            hi = meta.le if isinstance(meta, Le) else meta.lt
    if lo is not None and hi is not None:
        return f"a number from {lo} to {hi}"
    if choices := _literal_values(info.annotation):
        return "one of " + ", ".join(repr(c) for c in choices)
    if field == "prompt":
        return "a non-empty string"
    if field == "image_url":
        return "a non-empty image URL (s3://, https:// or data:)"
    if field.startswith("image_urls"):
        most = next((m.max_length for m in info.metadata if isinstance(m, MaxLen)), None)
        if most is None:
            return "a non-empty list of image URLs (s3://, https:// or data:)"
        return f"a list of 1 to {most} image URLs (s3://, https:// or data:)"
    return None


def validation_error_from(exc: ValidationError, model: type[BaseModel], endpoint: str) -> FluxValidationError:
    """Turn pydantic's error into one that names each field, what is allowed, and what was given."""
    errors: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "request"
        given = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            msg = f"unknown field for endpoint {endpoint}; allowed fields: {allowed}"
            if field == "num_images":  # FLUX.2 [pro] and [max]
                msg = f"{endpoint} makes one image a request (a batch sends one per image); allowed fields: {allowed}"
        elif err["type"] == "missing":
            msg = "is required"
        else:
            allowed_desc = _allowed_values(model, field)
            msg = f"must be {allowed_desc}" if allowed_desc else err["msg"]
            msg += f" (got {given!r})"
        errors.append((field, msg))
    text = "; ".join(f"{field}: {msg}" for field, msg in errors)
    return FluxValidationError(f"Invalid request for {endpoint}: {text}", errors=errors)


def build_payload(request: BaseModel | Mapping[str, Any], endpoint: str) -> dict[str, Any]:
    """Validate ``request`` for ``endpoint`` and return the JSON body to submit.

    A plain mapping and a model instance go through the same validation, so a bad value
    is refused the same way whichever form the caller used.

    :raises FluxValidationError: when a field is invalid; nothing is sent.
    """
    endpoint = endpoint.strip("/")
    model = REQUEST_MODELS.get(endpoint)
    data: Any = request.model_dump(exclude_none=True) if isinstance(request, BaseModel) else request
    if not isinstance(data, Mapping):
        raise FluxValidationError(
            f"Invalid request for {endpoint}: expected a mapping of input fields, got {type(data).__name__}"
        )
    if model is None:
        # Other fal endpoints: forwarded as given; the API validates them (a 422 is not retried).
        return dict(data)
    try:
        validated = model.model_validate(dict(data))
    except ValidationError as exc:
        raise validation_error_from(exc, model, endpoint) from None
    return validated.model_dump(exclude_none=True)


class RequestOptions(BaseModel):
    """fal's per-request options (headers of the submit, not fields of the input).

    :param start_timeout: seconds the request may wait to *start* (queue included), sent as
        ``X-Fal-Request-Timeout``; when it passes, fal answers 504 with
        ``X-Fal-Request-Timeout-Type: user``, which is final. fal's clients require more than 1 s.
    :param priority: ``normal`` or ``low`` (``X-Fal-Queue-Priority``): low lets a backfill
        queue behind an account's normal work.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    start_timeout: float | None = Field(default=None, gt=1)
    priority: Literal["normal", "low"] | None = None

    @classmethod
    def build(cls, **values: Any) -> RequestOptions:
        """The options, or :class:`FluxValidationError` naming the field and what is allowed."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            errors = []
            for err in exc.errors(include_url=False):
                field = ".".join(str(p) for p in err["loc"]) or "options"
                allowed = {
                    "start_timeout": "a number of seconds greater than 1",
                    "priority": "one of 'normal', 'low'",
                }.get(field, err["msg"])
                errors.append((field, f"must be {allowed} (got {err.get('input')!r})"))
            raise FluxValidationError(
                "Invalid request options: " + "; ".join(f"{f}: {m}" for f, m in errors), errors=errors
            ) from None

    def headers(self) -> dict[str, str]:
        """The submit's headers for these options."""
        headers = {}
        if self.start_timeout is not None:
            headers["X-Fal-Request-Timeout"] = f"{self.start_timeout:g}"
        if self.priority is not None:
            headers["X-Fal-Queue-Priority"] = self.priority
        return headers


class LogEntry(BaseModel):
    """One log line of a request, as the status endpoint reports it."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    message: str = ""
    level: str | None = None
    source: str | None = None
    timestamp: str | None = None

    @field_validator("message", mode="after")
    @classmethod
    def _no_signatures(cls, value: str) -> str:
        # The API's log lines may name an input URL; a presigned one is a credential.
        return redact_presigned(value)


class FluxStatus(BaseModel):
    """A status report of a queued request (``GET {status_url}`` or one SSE event)."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    status: str
    request_id: str | None = None
    queue_position: int | None = None
    logs: list[LogEntry] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    response_url: str | None = None
    status_url: str | None = None
    cancel_url: str | None = None

    @field_validator("error", mode="after")
    @classmethod
    def _no_signatures(cls, value: str | None) -> str | None:
        return None if value is None else redact_presigned(value)

    @property
    def is_completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def is_failed(self) -> bool:
        """COMPLETED with an error: fal's only in-band signal of a failed request."""
        return self.is_completed and bool(self.error or self.error_type)


class FluxRequestHandle(BaseModel):
    """What a submit returns and every later call needs; JSON-safe, so it travels in XCom.

    Holds no secret: the token is looked up from the connection whenever a call is made.
    ``flux_conn_id`` names the connection it was submitted with (an id, never a secret), so a
    sensor or a copy fed this handle uses the same account without repeating it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

    request_id: str = Field(min_length=1)
    status_url: str
    response_url: str
    cancel_url: str
    endpoint: str = KONTEXT_TEXT_TO_IMAGE
    flux_conn_id: str | None = None
    #: The caller's input images (``s3://`` URIs, unsigned URLs, ``data:`` summaries), never a
    #: presigned URL: what the result and the manifest say the request was made from.
    inputs: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, data: Any) -> Any:
        if isinstance(data, FluxRequestHandle):
            return data.model_dump()
        return data

    @classmethod
    def for_request_id(
        cls,
        request_id: str,
        *,
        base_url: str,
        endpoint: str = KONTEXT_TEXT_TO_IMAGE,
        flux_conn_id: str | None = None,
    ) -> FluxRequestHandle:
        """Build the URLs of a request from its id, the way fal does (owner/app only)."""
        app = "/".join(endpoint.strip("/").split("/")[:2])
        root = f"{base_url.rstrip('/')}/{app}/requests/{request_id}"
        return cls(
            request_id=request_id,
            status_url=f"{root}/status",
            response_url=root,
            cancel_url=f"{root}/cancel",
            endpoint=endpoint,
            flux_conn_id=flux_conn_id,
        )


class FluxImage(BaseModel):
    """One generated image: a public CDN URL (or a ``data:`` URI in sync mode)."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    url: str
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class FluxResult(BaseModel):
    """The result of a completed request (``GET {response_url}``)."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    images: list[FluxImage] = Field(default_factory=list)
    seed: int | None = None
    has_nsfw_concepts: list[bool] = Field(default_factory=list)
    prompt: str | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    request_id: str | None = None
    #: The fal model path the result came from, when known (the wait and the copy record it).
    endpoint: str | None = None
    #: The caller's input images of an edit (see :attr:`FluxRequestHandle.inputs`).
    inputs: list[str] | None = None
    #: What the request cost, by its endpoint's price rule (per image, or per megapixel of
    #: the images' real sizes), at the published prices or the connection's.
    cost_usd: float | None = None
    #: What fal billed, in the endpoint's unit, when its answer said (``X-Fal-Billable-Units``).
    billable_units: float | None = None
    #: The connection the request was made with (an id, never a secret): the copy downloads
    #: the images under its ``allowed_image_hosts``, as a handle's ``flux_conn_id``.
    flux_conn_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unwrap_legacy(cls, data: Any) -> Any:
        # Older fal responses wrap the payload as {"response": {...}}.
        if isinstance(data, Mapping) and "images" not in data and isinstance(data.get("response"), Mapping):
            inner = dict(data["response"])
            if "request_id" in data and "request_id" not in inner:
                inner["request_id"] = data["request_id"]
            return inner
        return data

    @field_validator("has_nsfw_concepts", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value
