"""What a copy to S3 will do, decided before anything is written: pure functions, no I/O.

Which images, under which keys, with which S3 metadata; and what the manifest says of
each afterwards. :class:`~airflow_flux.transfers.FluxToS3Operator` runs the plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from airflow_flux.exceptions import FluxError, FluxImageExistsError, s3_not_found
from airflow_flux.manifest import STORED_STATUSES, ImageStatus, ManifestImage
from airflow_flux.transfers.s3stream import whole_object_sha256

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from airflow_flux.models import FluxResult

EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
_MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/webp": (b"RIFF",),
}
# S3 user metadata is sent as HTTP headers: 2 KB in all, US-ASCII only.
_PROMPT_METADATA_LIMIT = 1024


NsfwPolicy = Literal["skip", "fail", "keep"]


def check_nsfw_policy(value: Any) -> None:
    """Refuse an ``nsfw_policy`` that is not one of the three, naming them."""
    if value not in ("skip", "fail", "keep"):
        raise ValueError(f"nsfw_policy: must be one of 'skip', 'fail', 'keep' (got {value!r})")


def sniff_content_type(head: bytes) -> str | None:
    """The image type its first bytes say it is."""
    for content_type, magics in _MAGIC.items():
        if any(head.startswith(m) for m in magics):
            if content_type == "image/webp" and head[8:12] != b"WEBP":
                continue
            return content_type
    return None


@dataclass
class ImageJob:
    """One image to copy: where from, where to, and what to record about it."""

    result: FluxResult
    index: int
    url: str
    key: str
    nsfw: bool
    content_type: str | None
    status: ImageStatus = ImageStatus.PENDING
    reason: str | None = None
    size: int | None = None
    sha256: str | None = None
    seconds: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: An object was at ``key`` before this try (overwritten only with ``replace``).
    existed: bool = False

    @property
    def request_id(self) -> str:
        return self.metadata["flux-request-id"]

    @property
    def stored(self) -> bool:
        return self.status.value in STORED_STATUSES

    def manifest_entry(self, bucket: str) -> ManifestImage:
        image = self.result.images[self.index]
        return ManifestImage(
            status=self.status,
            reason=self.reason,
            s3_uri=f"s3://{bucket}/{self.key}" if self.stored else None,
            key=self.key,
            request_id=self.result.request_id,
            index=self.index,
            seed=self.result.seed,
            prompt=self.result.prompt,
            endpoint=self.result.endpoint,
            width=image.width,
            height=image.height,
            content_type=self.content_type,
            size=self.size,
            sha256=self.sha256,
            nsfw=self.nsfw,
            timings=self.result.timings,
            copy_seconds=self.seconds,
            source_url=None if self.url.startswith("data:") else self.url,
            inputs=self.result.inputs,
            cost_usd=self.cost_usd,
        )

    @property
    def cost_usd(self) -> float | None:
        """This image's share of its request's cost."""
        result = self.result
        if result.cost_usd is None or not result.images:
            return None
        return round(result.cost_usd / len(result.images), 6)


def failed_entry(item: Mapping[str, Any]) -> ManifestImage:
    """The manifest entry of a request that failed (an item of a batch's result): no image."""
    reason = f"{item.get('error_type') or 'error'}: {item.get('error') or 'no reason given'}"
    return ManifestImage(
        status=ImageStatus.FAILED,
        reason=reason,
        key=None,
        request_id=item.get("request_id"),
        index=None,
        prompt=item.get("prompt"),
        endpoint=item.get("endpoint"),
        inputs=item.get("inputs"),
    )


def image_key(result: FluxResult, index: int, content_type: str | None, *, prefix: str, key_template: str) -> str:
    """The S3 key of image ``index`` of ``result``."""
    ext = EXTENSIONS.get(content_type or "", "jpg" if content_type is None else "bin")
    name = key_template.format(request_id=result.request_id, index=index, seed=result.seed, ext=ext)
    prefix = prefix.strip("/")
    return f"{prefix}/{name}" if prefix else name


def image_metadata(job: ImageJob) -> dict[str, str]:
    """The S3 user metadata of one image (ASCII: the prompt is URL-encoded, when it fits)."""
    result, image = job.result, job.result.images[job.index]
    prompt = result.prompt or ""
    meta = {
        "flux-request-id": str(result.request_id or ""),
        "flux-index": str(job.index),
        "flux-seed": "" if result.seed is None else str(result.seed),
        "flux-endpoint": str(result.endpoint or ""),
        "flux-width": "" if image.width is None else str(image.width),
        "flux-height": "" if image.height is None else str(image.height),
        "flux-nsfw": str(job.nsfw).lower(),
        "flux-prompt-sha256": hashlib.sha256(prompt.encode()).hexdigest(),
    }
    encoded = quote(prompt, safe=" ,.;:!?'()-_")
    if len(encoded) <= _PROMPT_METADATA_LIMIT:
        meta["flux-prompt"] = encoded  # URL-encoded: S3 metadata must be ASCII
    return meta


def plan_images(results: Sequence[FluxResult], *, prefix: str, key_template: str) -> list[ImageJob]:
    """Every image of ``results`` as a job with its key and metadata; refuses clashing keys."""
    jobs = []
    for result in results:
        for index, image in enumerate(result.images):
            nsfw = bool(result.has_nsfw_concepts[index]) if index < len(result.has_nsfw_concepts) else False
            content_type = image.content_type or (
                image.url[5:].split(";")[0] if image.url.startswith("data:") else None
            )
            job = ImageJob(
                result=result,
                index=index,
                url=image.url,
                key=image_key(result, index, content_type, prefix=prefix, key_template=key_template),
                nsfw=nsfw,
                content_type=content_type,
            )
            job.metadata = image_metadata(job)
            jobs.append(job)
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise FluxError(f"image_key_template gives several images the same key: {dupes[:5]}")
    return jobs


def existing_metadata(client: Any, bucket: str, key: str) -> dict[str, str] | None:
    """The existing object's metadata, with ``flux-sha256`` filled in from S3's own
    whole-object SHA-256 when the metadata lacks it (a streamed PUT cannot know its
    digest before the body is sent; S3 verified and stored it)."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if s3_not_found(exc):
            return None
        raise
    meta = dict(head.get("Metadata") or {})
    digest = whole_object_sha256(head)
    if digest and not meta.get("flux-sha256"):
        meta["flux-sha256"] = digest
    return meta


def check_destinations(client: Any, bucket: str, jobs: list[ImageJob], *, replace: bool) -> None:
    """Before writing anything: reuse this very image if a previous try copied it,
    refuse other existing keys unless ``replace``."""
    clashes = []
    for job in jobs:
        meta = existing_metadata(client, bucket, job.key)
        if meta is None:
            continue
        job.existed = True
        ours = (
            meta.get("flux-request-id") == job.metadata["flux-request-id"]
            and meta.get("flux-index") == job.metadata["flux-index"]
        )
        if ours and meta.get("flux-sha256") and not replace:
            job.status, job.sha256 = ImageStatus.REUSED, meta["flux-sha256"]
            job.reason = "already copied by an earlier try"
        elif not ours and not replace:
            # (An object of this very image without its digest is an earlier try cut
            # short between upload and verification: it is simply copied again.)
            clashes.append(job.key)
    if clashes:
        raise FluxImageExistsError(
            f"Refusing to overwrite existing object(s) in s3://{bucket}: {', '.join(clashes)} "
            "(set replace=True to overwrite). Nothing was written."
        )
