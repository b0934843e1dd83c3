"""Pydantic models of the FLUX.1 Kontext [pro] request, the queue status, the request handle
and the result.

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

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.redact import redact_presigned

#: The fal model this provider is built for, and the rest of the FLUX.1 Kontext family.
KONTEXT_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"
KONTEXT_EDIT = "fal-ai/flux-pro/kontext"
KONTEXT_MULTI = "fal-ai/flux-pro/kontext/multi"
KONTEXT_MAX_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/max/text-to-image"
KONTEXT_MAX_EDIT = "fal-ai/flux-pro/kontext/max"
KONTEXT_MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"

#: Published price per generated image, in US dollars (Black Forest Labs' and fal's lists:
#: [pro] $0.04, [max] $0.08). An aggregator resells at its own price: the connection's
#: ``price_per_image`` extra overrides these.
PRICE_PER_IMAGE_USD: dict[str, float] = {
    KONTEXT_TEXT_TO_IMAGE: 0.04,
    KONTEXT_EDIT: 0.04,
    KONTEXT_MULTI: 0.04,
    KONTEXT_MAX_TEXT_TO_IMAGE: 0.08,
    KONTEXT_MAX_EDIT: 0.08,
    KONTEXT_MAX_MULTI: 0.08,
}
#: Request fields that carry input images (the caller's URIs; see ``operators.inputs``).
IMAGE_INPUT_FIELDS: tuple[str, ...] = ("image_url", "image_urls")


def cost_usd(endpoint: str | None, images: int, *, price_per_image: float | None = None) -> float | None:
    """What ``images`` images of ``endpoint`` cost: ``price_per_image`` or the published price.

    None when neither is known (an endpoint outside the family, with no price set).
    """
    price = price_per_image if price_per_image is not None else PRICE_PER_IMAGE_USD.get((endpoint or "").strip("/"))
    return None if price is None else round(price * images, 6)


ASPECT_RATIOS: tuple[str, ...] = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
OUTPUT_FORMATS: tuple[str, ...] = ("jpeg", "png")
SAFETY_TOLERANCES: tuple[str, ...] = ("1", "2", "3", "4", "5", "6")

AspectRatio = Literal["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]
OutputFormat = Literal["jpeg", "png"]
SafetyTolerance = Literal["1", "2", "3", "4", "5", "6"]

# Status values of fal's queue. There is deliberately no FAILED: a failed request ends
# COMPLETED, with ``error``/``error_type`` in the status or an error on the result.
IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"


def _tolerance_to_str(value: Any) -> Any:
    # The API wants a string ("2"), but users naturally write 2; ints are accepted and
    # normalised. bool is an int subclass and is left alone so it fails validation.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class _KontextRequest(BaseModel):
    """The fields every FLUX.1 Kontext endpoint shares.

    :param prompt: what to draw (or how to edit); must not be empty.
    :param seed: makes the output reproducible for the same prompt and settings.
    :param guidance_scale: how closely to follow the prompt, 1 to 20 (API default 3.5).
    :param num_images: images to generate, 1 to 4 (API default 1).
    :param output_format: ``jpeg`` or ``png`` (API default ``jpeg``).
    :param safety_tolerance: ``"1"`` (strictest) to ``"6"`` (API default ``"2"``).
    :param aspect_ratio: one of 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16, 9:21 (text-to-image
        default 1:1; an edit keeps its input's when unset).
    :param enhance_prompt: let the API rewrite the prompt before generating.
    :param sync_mode: return images inline as ``data:`` URIs instead of CDN URLs.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, frozen=True, defer_build=True)

    endpoint: ClassVar[str]

    prompt: str = Field(min_length=1)
    seed: int | None = None
    guidance_scale: float | None = Field(default=None, ge=1, le=20)
    num_images: int | None = Field(default=None, ge=1, le=4)
    output_format: OutputFormat | None = None
    safety_tolerance: Annotated[SafetyTolerance | None, BeforeValidator(_tolerance_to_str)] = None
    aspect_ratio: AspectRatio | None = None
    enhance_prompt: bool | None = None
    sync_mode: bool | None = None

    def to_payload(self) -> dict[str, Any]:
        """The JSON body to send: only what the user set, so the API's own defaults apply."""
        return self.model_dump(exclude_none=True)


class KontextTextToImageRequest(_KontextRequest):
    """Input of ``fal-ai/flux-pro/kontext/text-to-image``: the shared fields."""

    endpoint: ClassVar[str] = KONTEXT_TEXT_TO_IMAGE


class KontextEditRequest(_KontextRequest):
    """Input of ``fal-ai/flux-pro/kontext`` (an edit of one image).

    :param image_url: the image to edit: a URL fal can fetch without credentials, or a
        ``data:`` URI (the operators turn ``s3://`` URIs into one of these).
    """

    endpoint: ClassVar[str] = KONTEXT_EDIT

    image_url: str = Field(min_length=1)


class KontextMultiRequest(_KontextRequest):
    """Input of ``fal-ai/flux-pro/kontext/multi`` (several reference images).

    :param image_urls: the reference images, at least one (URLs or ``data:`` URIs).
    """

    endpoint: ClassVar[str] = KONTEXT_MULTI

    image_urls: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)


class KontextMaxTextToImageRequest(KontextTextToImageRequest):
    """Input of ``fal-ai/flux-pro/kontext/max/text-to-image``."""

    endpoint: ClassVar[str] = KONTEXT_MAX_TEXT_TO_IMAGE


class KontextMaxEditRequest(KontextEditRequest):
    """Input of ``fal-ai/flux-pro/kontext/max``."""

    endpoint: ClassVar[str] = KONTEXT_MAX_EDIT


class KontextMaxMultiRequest(KontextMultiRequest):
    """Input of ``fal-ai/flux-pro/kontext/max/multi``."""

    endpoint: ClassVar[str] = KONTEXT_MAX_MULTI


#: Request models by endpoint. Endpoints not listed here take a free-form JSON object.
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    model.endpoint: model
    for model in (
        KontextTextToImageRequest,
        KontextEditRequest,
        KontextMultiRequest,
        KontextMaxTextToImageRequest,
        KontextMaxEditRequest,
        KontextMaxMultiRequest,
    )
}


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
    choices = {
        "aspect_ratio": ASPECT_RATIOS,
        "output_format": OUTPUT_FORMATS,
        "safety_tolerance": SAFETY_TOLERANCES,
    }.get(field)
    if choices and field in model.model_fields:
        return "one of " + ", ".join(repr(c) for c in choices)
    if field == "prompt":
        return "a non-empty string"
    if field == "image_url":
        return "a non-empty image URL (s3://, https:// or data:)"
    if field.startswith("image_urls"):
        return "a non-empty list of image URLs (s3://, https:// or data:)"
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
    #: What the request cost: price per image (published, or the connection's) x images.
    cost_usd: float | None = None
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
