"""What identifies a paid request: its fingerprint, its record in ``task_state_store``, its connection.

A retry may reuse the request an earlier try paid for only when it is the very request this
try would submit. The fingerprint says so: a SHA-256 over the endpoint, the canonical JSON
of the payload (sorted keys) and the connection's base URL. Beside it the record keeps one
short digest per field, so a mismatch can say *which* fields differ without storing (or
logging) their values, and the task instance's ``max_tries`` at submit time, which a user's
clear raises and an automatic retry does not: a clear means "run it again".

An ``s3://`` input is identified by its object, not its name: the URI is pinned to the
object's version (``s3://bucket/key?versionId=V`` where the bucket keeps versions, else
``s3://bucket/key?etag=E``) before the fingerprint is taken, so an object replaced between
two tries is a new request, and the handle, results and manifest record which bytes were
edited (:func:`pin_s3_uri`, :func:`split_s3_input`).

A leaf module (pydantic and the models only), used by the operators, the transfer and the gallery.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.models import FluxRequestHandle

#: The connection a task uses when neither it nor its request handle names one.
DEFAULT_CONN_ID = "flux_default"
#: ``task_state_store`` key of the submitted request (the same key as before fingerprints, so
#: an entry an older version wrote is seen, and refused for having no fingerprint).
STATE_KEY = "flux_request"


#: The pin an ``s3://`` input may end with: ``?versionId=...`` or ``?etag=...`` (S3 keys may
#: hold a ``?`` of their own; only a trailing pin of this form is read as one).
_PIN = re.compile(r"\?(?P<kind>versionId|etag)=(?P<value>[^?&/\s]+)$")


def pin_s3_uri(bucket: str, key: str, *, version_id: str | None = None, etag: str | None = None) -> str:
    """The ``s3://`` URI of one version of an object: its VersionId when the bucket keeps
    versions (``"null"`` is no version), else its ETag (quotes dropped).

    :param bucket: the bucket.
    :param key: the object's key.
    :param version_id: the object's ``VersionId``, as ``HeadObject`` returns it.
    :param etag: the object's ``ETag``.
    """
    if version_id and version_id != "null":
        return f"s3://{bucket}/{key}?versionId={version_id}"
    if etag:
        return f"s3://{bucket}/{key}?etag={etag.strip(chr(34))}"
    return f"s3://{bucket}/{key}"


def split_s3_input(uri: str) -> tuple[str, str, str | None, str | None]:
    """``(bucket, key, version_id, etag)`` of an ``s3://`` input, pinned or not.

    :param uri: ``s3://bucket/key``, optionally ending in ``?versionId=V`` or ``?etag=E``.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri[:100]!r}")
    bucket, _, key = uri[5:].partition("/")
    version_id = etag = None
    if match := _PIN.search(key):
        key = key[: match.start()]
        if match["kind"] == "versionId":
            version_id = match["value"]
        else:
            etag = match["value"]
    if not bucket or not key:
        raise ValueError(f"an s3:// URI needs a bucket and a key, s3://bucket/key (got {uri[:100]!r})")
    return bucket, key, version_id, etag


def s3_object_args(bucket: str, key: str, version_id: str | None, etag: str | None) -> dict[str, str]:
    """``HeadObject``/``GetObject`` arguments for one version of an object: by ``VersionId``,
    else the key only while it still has ``etag`` (S3 answers 412 otherwise)."""
    args = {"Bucket": bucket, "Key": key}
    if version_id:
        args["VersionId"] = version_id
    elif etag:
        args["IfMatch"] = f'"{etag}"'
    return args


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


class RequestIdentity(BaseModel):
    """The fingerprint of one request, and a digest of each of its fields.

    Build it with :meth:`of` from what is (or was) sent. Holds no value of any field, so it can
    be stored and logged: the field digests are truncated SHA-256s.
    """

    model_config = ConfigDict(frozen=True, defer_build=True)

    fingerprint: str
    fields: dict[str, str]

    @classmethod
    def of(cls, *, endpoint: str, payload: Mapping[str, Any], base_url: str) -> RequestIdentity:
        """The identity of ``payload`` sent to ``endpoint`` on the connection at ``base_url``."""
        # The base URL is normalised the way the connection settings are (no trailing slash),
        # so "https://queue.fal.run/" and "https://queue.fal.run" are one account's host.
        base, path, body = base_url.rstrip("/"), endpoint.strip("/"), dict(payload)
        whole = {"base_url": base, "endpoint": path, "payload": body}
        fields = {"base_url": base, "endpoint": path, **{f"payload.{k}": v for k, v in body.items()}}
        return cls(
            fingerprint=hashlib.sha256(_canonical(whole)).hexdigest(),
            fields={name: hashlib.sha256(_canonical(v)).hexdigest()[:16] for name, v in fields.items()},
        )

    def differing_fields(self, other: RequestIdentity) -> list[str]:
        """Names of the fields whose values differ (or that only one side sets), sorted."""
        names = set(self.fields) | set(other.fields)
        return sorted(n.removeprefix("payload.") for n in names if self.fields.get(n) != other.fields.get(n))


class StoredRequest(BaseModel):
    """What a submit records in ``task_state_store``: the handle and what it was paid for.

    :param handle: the request's handle, as the submit returned it.
    :param identity: the fingerprint of the request that was sent.
    :param max_tries: the task instance's ``max_tries`` when it submitted (a clear raises it).
    :param try_number: the try that submitted.
    :param outcome: what became of the request, once known (a batch keeps each request's
        compact result, so a retry after fal's one-hour result retention still has it).
    """

    model_config = ConfigDict(extra="ignore", defer_build=True)

    handle: dict[str, Any]
    identity: RequestIdentity
    max_tries: int | None = None
    try_number: int | None = None
    outcome: dict[str, Any] | None = None

    @classmethod
    def load(cls, value: Any) -> StoredRequest | None:
        """The stored record, or None when ``value`` is not one (an older version's bare handle)."""
        if not isinstance(value, Mapping) or "identity" not in value:
            return None
        try:
            return cls.model_validate(value)
        except ValidationError:
            return None


def coerce_handle(request: Any) -> dict[str, Any]:
    """Accept a submit handle as a dict, a model, JSON text or a bare request id."""
    if isinstance(request, FluxRequestHandle):
        return request.model_dump()
    if isinstance(request, str):
        text = request.strip()
        if text.startswith("{"):
            try:
                request = json.loads(text)
            except ValueError:
                raise FluxValidationError(f"request: not a valid handle: {text[:200]!r}") from None
        else:
            return {"request_id": text}
    if isinstance(request, Mapping) and request.get("request_id"):
        return dict(request)
    raise FluxValidationError(
        "request: expected the submit task's output (a dict with request_id, status_url, response_url, "
        f"cancel_url) or a request id, got {type(request).__name__}"
    )


def conn_id_for(handle: Mapping[str, Any], explicit: str | None) -> tuple[str, str | None]:
    """The connection to use for ``handle``, and a warning when the task overrides the handle's.

    The handle records the connection it was submitted with; a task that names none uses it
    (a request of account A polled with account B's token is refused or, worse, is another
    account's). An explicit ``flux_conn_id`` still wins: the user may have moved the
    connection, but it is worth a line in the task log.
    """
    recorded = handle.get("flux_conn_id") or None
    if not explicit:
        return str(recorded or DEFAULT_CONN_ID), None
    if recorded and recorded != explicit:
        return explicit, (
            f"FLUX request {handle.get('request_id')} was submitted with connection {recorded!r}; "
            f"using flux_conn_id={explicit!r} as this task asks"
        )
    return explicit, None
