"""Input images of an edit: the caller's URIs, and what fal is sent for them.

Each ``image_url`` / ``image_urls`` value may be

- ``s3://bucket/key``: checked (it exists, before anything is paid for) and pinned to the
  object it is now (:meth:`InputResolver.pin`: ``?versionId=`` or ``?etag=``, see
  :mod:`airflow_flux.identity`), then sent as a presigned GET URL of that version made
  with the amazon provider's ``S3Hook`` (the bucket stays private), or inlined as a
  ``data:`` URI with ``input_delivery="data_uri"`` (buckets that refuse presigned
  access), up to :data:`MAX_INLINE_BYTES`, read only if it is still that object. A caller
  may pin an input itself the same way;
- an ``http(s)://`` URL or a ``data:`` URI: sent as is.

A presigned URL is a credential while it lives: it is registered with Airflow's secrets
masker, and only the caller's URIs (:func:`describe_inputs`) reach XCom, the task state,
trigger rows, logs and the manifest. The request fingerprint is computed on the pinned
caller's values: a retry recognises its own request, unless an input object was replaced
since (then it is a new request, with the new bytes). A presigned URL can only pin a
version where the bucket keeps versions; elsewhere fal fetches the key as it is when its
runner starts, moments after the ETag was read.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING, Any, Literal

from airflow_flux.exceptions import FluxValidationError, s3_not_found
from airflow_flux.identity import pin_s3_uri, s3_object_args, split_s3_input
from airflow_flux.models import IMAGE_INPUT_FIELDS
from airflow_flux.redact import redact_presigned

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

InputDelivery = Literal["presigned_url", "data_uri"]
INPUT_DELIVERIES: tuple[str, ...] = ("presigned_url", "data_uri")
#: Largest ``s3://`` input inlined as a ``data:`` URI: it travels in the request body, which
#: fal stores (unless ``store_io`` is off) and the worker holds in memory, base64 (4/3 larger).
MAX_INLINE_BYTES = 10 * 1024 * 1024
#: How long a presigned input URL lives when no start deadline says more.
DEFAULT_URL_EXPIRES_IN = 3600
#: Beyond the start deadline: fal fetches inputs when a runner starts, and retries a failed start.
URL_EXPIRY_MARGIN = 900
_SCHEMES = ("s3://", "https://", "http://", "data:")


def _values(payload: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field, value)`` for each input image of ``payload``, in order (``image_urls[1]``...)."""
    found: list[tuple[str, str]] = []
    for name in IMAGE_INPUT_FIELDS:
        value = payload.get(name)
        if isinstance(value, str):
            found.append((name, value))
        elif isinstance(value, list):
            found.extend((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, str))
    return found


def _map_inputs(payload: Mapping[str, Any], fn: Callable[[str, str], str]) -> dict[str, Any]:
    """``payload`` with each input image value replaced by ``fn(field, value)``."""
    mapped = dict(payload)
    for name in IMAGE_INPUT_FIELDS:
        value = payload.get(name)
        if isinstance(value, str):
            mapped[name] = fn(name, value)
        elif isinstance(value, list):
            mapped[name] = [fn(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return mapped


def check_inputs(payload: Mapping[str, Any]) -> None:
    """Refuse an input that is not an ``s3://``, ``http(s)://`` or ``data:`` URI, naming its field."""
    for field, value in _values(payload):
        if not value.startswith(_SCHEMES):
            raise FluxValidationError(
                f"{field}: must be an s3://bucket/key URI, an https:// URL or a data: URI (got {value[:100]!r})",
                errors=[(field, "must be an s3://, https:// or data: URI")],
            )
        if value.startswith("s3://"):
            try:
                split_s3_input(value)
            except ValueError:
                raise FluxValidationError(
                    f"{field}: an s3:// URI needs a bucket and a key, s3://bucket/key (got {value!r})",
                    errors=[(field, "must be s3://bucket/key")],
                ) from None


def has_s3_inputs(payload: Mapping[str, Any]) -> bool:
    """Whether ``payload`` has an ``s3://`` input to presign or inline."""
    return any(value.startswith("s3://") for _, value in _values(payload))


def describe_input(value: str) -> str:
    """What may be recorded of an input: an ``s3://`` URI as is, a URL without a signature,
    a ``data:`` URI as its type, size and digest (not its bytes)."""
    if value.startswith("data:"):
        header, _, body = value.partition(",")
        digest = hashlib.sha256(body.encode()).hexdigest()[:16]
        return f"{header.split(';')[0]};{len(body) * 3 // 4} bytes;sha256:{digest}"
    return redact_presigned(value)


def describe_inputs(payload: Mapping[str, Any]) -> list[str] | None:
    """The caller's inputs of ``payload`` as recorded in the handle, results and manifest."""
    return [describe_input(value) for _, value in _values(payload)] or None


def url_expires_in(start_timeout: float | None, override: int | None = None) -> int:
    """Seconds a presigned input URL lives: ``override``, else long enough to cover the start deadline."""
    if override is not None:
        return int(override)
    return max(DEFAULT_URL_EXPIRES_IN, int(start_timeout or 0) + URL_EXPIRY_MARGIN)


class InputResolver:
    """Turns the ``s3://`` inputs of a payload into what fal can fetch.

    :param s3_hook: the amazon provider's hook (``aws_conn_id``).
    :param delivery: ``presigned_url`` (default) or ``data_uri``.
    :param expires_in: lifetime of presigned URLs, seconds.
    """

    def __init__(self, s3_hook: S3Hook, *, delivery: str = "presigned_url", expires_in: int = DEFAULT_URL_EXPIRES_IN):
        if delivery not in INPUT_DELIVERIES:
            raise FluxValidationError(
                f"input_delivery: must be one of 'presigned_url', 'data_uri' (got {delivery!r})",
                errors=[("input_delivery", "must be 'presigned_url' or 'data_uri'")],
            )
        self.s3_hook = s3_hook
        self.delivery = delivery
        self.expires_in = expires_in
        # One HEAD per input URI: a batch often edits the same few inputs many times.
        self._pins: dict[str, str] = {}

    @classmethod
    def for_task(
        cls,
        aws_conn_id: str | None,
        *,
        delivery: str = "presigned_url",
        start_timeout: float | None = None,
        expires_in: int | None = None,
    ) -> InputResolver:
        """The resolver of an operator's ``s3://`` inputs.

        :param aws_conn_id: the amazon provider's connection.
        :param delivery: ``presigned_url`` or ``data_uri``.
        :param start_timeout: the request's start deadline (presigned URLs outlive it).
        :param expires_in: the lifetime of presigned URLs, when the task sets one.
        """
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return cls(
            S3Hook(aws_conn_id=aws_conn_id), delivery=delivery, expires_in=url_expires_in(start_timeout, expires_in)
        )

    def pin(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``payload`` with each ``s3://`` input checked and pinned to the object it is now.

        Refuses, naming the field, an input that does not exist or cannot be read (nothing is
        paid for yet). An input the caller pinned is checked to still be that version.
        """
        return _map_inputs(payload, self._pin)

    def _pin(self, field: str, value: str) -> str:
        if not value.startswith("s3://"):
            return value
        if value not in self._pins:
            bucket, key, version_id, etag = split_s3_input(value)
            head = self._head(field, value, bucket, key, version_id=version_id, etag=etag)
            self._pins[value] = pin_s3_uri(
                bucket, key, version_id=head.get("VersionId") or version_id, etag=str(head.get("ETag") or "") or etag
            )
        return self._pins[value]

    def resolve(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``payload`` with each ``s3://`` input replaced; other values unchanged."""
        return _map_inputs(payload, self._one)

    def _one(self, field: str, value: str) -> str:
        if not value.startswith("s3://"):
            return value
        value = self._pin(field, value)  # a no-op for a payload :meth:`pin` already pinned
        bucket, key, version_id, etag = split_s3_input(value)
        if self.delivery == "data_uri":
            return self._inline(field, value, bucket, key, version_id=version_id, etag=etag)
        from airflow.sdk.log import mask_secret

        params = {"Bucket": bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id  # fal fetches exactly the version the fingerprint names
        url = self.s3_hook.generate_presigned_url(client_method="get_object", params=params, expires_in=self.expires_in)
        if not url:
            raise FluxValidationError(
                f"{field}: could not presign {value} with aws_conn_id={self.s3_hook.aws_conn_id!r}"
            )
        mask_secret(url)  # a credential while it lives: never in a log line in full
        return url

    def _head(
        self, field: str, value: str, bucket: str, key: str, *, version_id: str | None, etag: str | None
    ) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        try:
            return dict(self.s3_hook.get_conn().head_object(**s3_object_args(bucket, key, version_id, etag)))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("412", "PreconditionFailed"):
                reason = "was replaced: it is no longer the object of that ETag"
            elif s3_not_found(exc) or code == "NoSuchVersion":
                reason = "does not exist"
            else:
                reason = f"cannot be read ({code})"
            raise FluxValidationError(
                f"{field}: {value} {reason} (aws_conn_id={self.s3_hook.aws_conn_id!r}); nothing was submitted",
                errors=[(field, reason)],
            ) from None

    def _inline(
        self, field: str, value: str, bucket: str, key: str, *, version_id: str | None, etag: str | None
    ) -> str:
        from botocore.exceptions import ClientError

        # The pinned object only: its version, or (unversioned) the key while it has that ETag.
        try:
            obj = self.s3_hook.get_conn().get_object(**s3_object_args(bucket, key, version_id, etag))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            raise FluxValidationError(
                f"{field}: {value} cannot be read ({code}): it was replaced or removed since it was checked",
                errors=[(field, f"cannot be read ({code})")],
            ) from None
        size = int(obj.get("ContentLength") or 0)
        if size > MAX_INLINE_BYTES:
            obj["Body"].close()
            raise FluxValidationError(
                f"{field}: {value} is {size} bytes, above the {MAX_INLINE_BYTES} bytes input_delivery='data_uri' "
                "inlines; use input_delivery='presigned_url'",
                errors=[(field, f"larger than {MAX_INLINE_BYTES} bytes")],
            )
        body = obj["Body"].read(MAX_INLINE_BYTES + 1)
        content_type = str(obj.get("ContentType") or "application/octet-stream").split(";")[0]
        return f"data:{content_type};base64,{base64.b64encode(body).decode()}"
