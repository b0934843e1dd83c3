"""The manifest a copy to S3 writes beside its images, typed once for the writer and the gallery.

A leaf module: :class:`~airflow_flux.transfers.FluxToS3Operator` writes it, the Flux gallery
(:mod:`airflow_flux.plugins.store`) and other jobs read it. Its JSON keys are the
contract: ``version`` changes if a key's meaning does.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

MANIFEST_VERSION = 1


class ImageStatus(str, Enum):
    """What became of one image."""

    #: planned, not copied yet (never in a written manifest).
    PENDING = "pending"
    #: copied by this try.
    COPIED = "copied"
    #: not copied: ``reason`` says why (``nsfw``).
    SKIPPED = "skipped"
    #: an earlier try copied this very image: left as it is.
    REUSED = "reused"
    #: the request failed (a batch's ``allow_failures``): no image; ``reason`` has the API's.
    FAILED = "failed"


#: Statuses of entries that have an object in S3.
STORED_STATUSES: frozenset[str] = frozenset({ImageStatus.COPIED.value, ImageStatus.REUSED.value})


class ManifestImage(BaseModel):
    """One image of the manifest, copied or not."""

    model_config = ConfigDict(defer_build=True)

    status: ImageStatus
    reason: str | None = None
    s3_uri: str | None = None
    #: The object's key (None for a failed request: there is no image).
    key: str | None
    request_id: str | None = None
    #: The image's index within its request (None for a failed request).
    index: int | None
    seed: int | None = None
    prompt: str | None = None
    endpoint: str | None = None
    width: int | None = None
    height: int | None = None
    content_type: str | None = None
    size: int | None = None
    sha256: str | None = None
    nsfw: bool = False
    timings: dict[str, Any] | None = None
    copy_seconds: float | None = None
    source_url: str | None = None
    #: The caller's input images of an edit (``s3://`` URIs, never presigned URLs).
    inputs: list[str] | None = None
    #: This image's share of its request's cost, US dollars.
    cost_usd: float | None = None


class Manifest(BaseModel):
    """``manifest.json``: the run and task that wrote it, and every image it planned."""

    model_config = ConfigDict(defer_build=True)

    version: int = MANIFEST_VERSION
    created_at: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    bucket: str
    prefix: str
    images: list[ManifestImage]
    #: What the requests behind these images cost in all, US dollars (None: no price known).
    cost_usd: float | None = None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; a ValueError for anything else.

    :param uri: an ``s3://`` URI (a manifest's own, or one of its entries').
    """
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def write_manifest(client: Any, manifest: Manifest, key: str) -> str:
    """Put ``manifest`` at ``key`` of its bucket (indented JSON, S3 checksummed); its ``s3://`` URI.

    :param client: a boto3 S3 client.
    :param manifest: the manifest (its ``bucket`` is where it goes).
    :param key: the object's key.
    """
    body = json.dumps(manifest.model_dump(mode="json"), indent=2).encode()
    client.put_object(
        Bucket=manifest.bucket, Key=key, Body=body, ContentType="application/json", ChecksumAlgorithm="SHA256"
    )
    return f"s3://{manifest.bucket}/{key}"
