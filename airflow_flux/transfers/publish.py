"""Publish reviewed images: copy the approved entries of a staging manifest to another prefix.

Nothing is generated or downloaded again: each approved image is copied inside S3
(``CopyObject``). Before anything is copied, each approved staging object is checked: its S3
whole-object SHA-256 must be the staging manifest's (the image the reviewer was shown), and
the ETag it has then is the copy's precondition (``CopySourceIfMatch``), so S3 refuses to
copy an object replaced since. Each copy's own SHA-256 is checked too: that covers stores that
ignore the precondition (moto does) and staging objects S3 keeps no whole-object SHA-256 of
(multipart uploads), which the first check cannot judge. The published manifest is merged in
last (:func:`~airflow_flux.manifest_store.merge_manifest`): a reader that finds it finds every image
it lists.

A publish deletes only objects it created. Each destination key is looked at first; a failure
deletes the copies made to keys that were free then (each such copy is itself conditional on
the key still being free, ``If-None-Match``). With ``replace``, keys that held other bytes are
overwritten last (``If-Match`` the object looked at, so a failure among the new keys leaves them
untouched) and are reported, never deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from airflow_flux.exceptions import FluxImageExistsError, FluxIntegrityError, s3_not_found
from airflow_flux.manifest import (
    STORED_STATUSES,
    ImageStatus,
    Manifest,
    ManifestImage,
    split_s3_uri,
)
from airflow_flux.manifest_store import check_manifest_key, merge_manifest
from airflow_flux.transfers.s3stream import whole_object_sha256

if TYPE_CHECKING:
    from collections.abc import Collection

    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

log = logging.getLogger(__name__)

#: S3Hook.copy_object sends ``ACL=private`` unless told this: buckets with ACLs disabled
#: (the default since 2023) refuse ACLs, and the bucket's own policy should decide anyway.
_NO_ACL = "no-acl"


@dataclass
class PublishResult:
    """What a publish did: the manifest it wrote, the images it published and those it left out."""

    manifest_uri: str
    #: This publish's entries of the published manifest (``copied``, or ``reused`` from an earlier try).
    published: list[ManifestImage]
    #: Staged images that were not approved, as the staging manifest lists them (not copied).
    rejected: list[ManifestImage]
    #: Keys of rejected images an earlier answer had published, deleted after the manifest (none
    #: that another writer of the manifest lists).
    withdrawn: list[str]
    #: Keys that held other bytes before this publish and now hold a published image (``replace``).
    replaced: list[str] = field(default_factory=list)


@dataclass
class _Destination:
    """A destination key as it was before the publish: ``free``, holding ``same`` image, or ``other`` bytes."""

    state: Literal["free", "same", "other"]
    etag: str | None = None


def read_manifest(s3_hook: S3Hook, uri: str) -> Manifest:
    """The manifest at ``uri`` (as ``FluxToS3Operator`` writes it)."""
    bucket, key = split_s3_uri(uri)
    body = s3_hook.get_conn().get_object(Bucket=bucket, Key=key)["Body"].read()
    return Manifest.model_validate_json(body)


def review_images(manifest: Manifest) -> list[ManifestImage]:
    """The images a reviewer chooses from, in manifest order: image number ``n`` is ``[n - 1]``.

    Only images stored in S3 (of every task that copied into the staging prefix): skipped
    (NSFW) and failed entries have nothing to publish.
    """
    return [i for i in manifest.images if i.status.value in STORED_STATUSES and i.key]


def _published_key(key: str, source_prefix: str, prefix: str) -> str:
    relative = key[len(source_prefix) :].lstrip("/") if source_prefix and key.startswith(source_prefix) else key
    return f"{prefix}/{relative}" if prefix else relative


def publish_images(
    s3_hook: S3Hook,
    staging_manifest_uri: str,
    approved: Collection[int],
    *,
    prefix: str,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int = -1,
    bucket: str | None = None,
    manifest_name: str = "manifest.json",
    replace: bool = False,
) -> PublishResult:
    """Copy the approved images of a staging manifest under ``prefix`` and write their manifest.

    :param s3_hook: the connection that reads the staging objects and writes the published ones.
    :param staging_manifest_uri: ``s3://`` URI of the manifest the staging copy wrote.
    :param approved: 1-based numbers of :func:`review_images` to publish; the others are rejected.
        Empty: nothing is copied and the manifest lists no image (the review is still recorded).
    :param prefix: where the images and the manifest go; each keeps its name under the
        staging prefix.
    :param dag_id: written into the manifest, as are ``run_id``, ``task_id``, ``map_index``.
    :param bucket: the destination bucket; by default the staging manifest's.
    :param manifest_name: name of the published manifest under ``prefix``.
    :param replace: overwrite existing keys holding other bytes (reported in
        :attr:`PublishResult.replaced`, never deleted, even by a failed publish), and a manifest
        key holding something that is not a manifest; when off (default), either fails the call
        before anything is written. A key already holding this very image (an earlier try) is
        kept either way.
    """
    if not manifest_name or "/" in manifest_name:
        raise ValueError(f"manifest_name: a file name is needed (got {manifest_name!r})")
    staging = read_manifest(s3_hook, staging_manifest_uri)
    staged = review_images(staging)
    unknown = sorted(n for n in set(approved) if not 1 <= n <= len(staged))
    if unknown:
        raise ValueError(f"Image number(s) {unknown} not in the staging manifest (1 to {len(staged)})")
    prefix = prefix.strip("/")
    dest_bucket = bucket or staging.bucket
    if (dest_bucket, prefix) == (staging.bucket, staging.prefix.strip("/")):
        raise ValueError(f"The published prefix is the staging prefix s3://{dest_bucket}/{prefix}")
    chosen = sorted(set(approved))
    rejected = [image for n, image in enumerate(staged, start=1) if n not in chosen]
    plan: list[tuple[ManifestImage, str]] = []
    for n in chosen:
        image = staged[n - 1]
        if not image.sha256:
            raise FluxIntegrityError(f"Image {n} ({image.key}) has no SHA-256 in the staging manifest")
        plan.append((image, _published_key(str(image.key), staging.prefix.strip("/"), prefix)))

    client = s3_hook.get_conn()
    manifest_key = f"{prefix}/{manifest_name}" if prefix else manifest_name
    destinations = _check_destinations(client, dest_bucket, plan, replace=replace)
    check_manifest_key(client, dest_bucket, manifest_key, replace=replace)
    entries = [
        _entry(image, dest_bucket, key, ImageStatus.REUSED, None) if dest.state == "same" else None
        for (image, key), dest in zip(plan, destinations, strict=True)
    ]
    todo = [n for n, dest in enumerate(destinations) if dest.state != "same"]
    # Every source is checked before the first copy: a replaced one publishes nothing.
    source_etags = {n: _checked_source(client, staging.bucket, plan[n][0]) for n in todo}
    # New keys first: a failure among them leaves every object that existed before untouched.
    todo.sort(key=lambda n: destinations[n].state == "other")
    created: list[str] = []
    replaced: list[str] = []
    try:
        for n in todo:
            image, key = plan[n]
            started = time.monotonic()
            _copy(s3_hook, staging.bucket, image, dest_bucket, key, source_etags[n], destinations[n])
            (replaced if destinations[n].state == "other" else created).append(key)
            digest = whole_object_sha256(client.head_object(Bucket=dest_bucket, Key=key, ChecksumMode="ENABLED"))
            if digest != image.sha256:
                raise FluxIntegrityError(
                    f"s3://{staging.bucket}/{image.key} is not the image that was reviewed: its copy's SHA-256 is "
                    f"{digest or 'unknown'}, the staging manifest says {image.sha256}"
                )
            entries[n] = _entry(image, dest_bucket, key, ImageStatus.COPIED, round(time.monotonic() - started, 3))
        listed = [e for e in entries if e is not None]
        own = Manifest(
            created_at=datetime.now(timezone.utc).isoformat(),
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            map_index=map_index,
            bucket=dest_bucket,
            prefix=prefix,
            images=listed,
            cost_usd=_cost(listed),
        )
        published = own.images  # now naming this publish as their writer
        merged = merge_manifest(client, own, manifest_key, replace=replace)
    except BaseException:
        # Leave the published prefix as it was, as far as that is ours to do: the copies to keys
        # that were free are deleted (a retry, or a person, starts clean); objects that existed
        # before are not, even if this publish overwrote them.
        if created:
            client.delete_objects(Bucket=dest_bucket, Delete={"Objects": [{"Key": k} for k in created], "Quiet": True})
        if replaced:
            log.warning(
                "Publish failed after overwriting %d object(s) that existed before it; left as they are: %s",
                len(replaced),
                ", ".join(f"s3://{dest_bucket}/{k}" for k in replaced),
            )
        raise
    withdrawn = _withdraw(client, dest_bucket, staging.prefix.strip("/"), prefix, rejected, merged)
    _report_lineage(
        s3_hook,
        (staging.bucket, staging_manifest_uri, staging.prefix, [str(image.key) for image, _ in plan]),
        (dest_bucket, f"s3://{dest_bucket}/{manifest_key}", prefix, [key for _, key in plan]),
    )
    return PublishResult(
        manifest_uri=f"s3://{dest_bucket}/{manifest_key}",
        published=published,
        rejected=rejected,
        withdrawn=withdrawn,
        replaced=replaced,
    )


def _checked_source(client: Any, bucket: str, image: ManifestImage) -> str:
    """The ETag of the staged object, once its SHA-256 is known to be the reviewed image's
    (when S3 has none, a multipart upload, the copy's own is checked instead)."""
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=str(image.key), ChecksumMode="ENABLED")
    except ClientError as exc:
        if s3_not_found(exc):
            raise FluxIntegrityError(
                f"s3://{bucket}/{image.key} is gone since the review. Nothing was published."
            ) from None
        raise
    digest = whole_object_sha256(head)
    if digest is not None and digest != image.sha256:
        raise FluxIntegrityError(
            f"s3://{bucket}/{image.key} is not the image that was reviewed: SHA-256 {digest}, the staging "
            f"manifest says {image.sha256}. Nothing was published."
        )
    return str(head["ETag"])


def _copy(
    s3_hook: S3Hook,
    source_bucket: str,
    image: ManifestImage,
    bucket: str,
    key: str,
    source_etag: str,
    destination: _Destination,
) -> None:
    """One conditional copy: of the very object that was checked, onto the very key that was looked at."""
    from botocore.exceptions import ClientError

    # S3 refuses a source replaced since its check, a free key written since, or an overwritten key changed since.
    target = {"IfMatch": destination.etag} if destination.state == "other" else {"IfNoneMatch": "*"}
    try:
        s3_hook.copy_object(
            str(image.key),
            key,
            source_bucket_name=source_bucket,
            dest_bucket_name=bucket,
            acl_policy=_NO_ACL,
            CopySourceIfMatch=source_etag,
            # S3 computes the copy's own SHA-256, checked against the reviewed image's after the copy.
            ChecksumAlgorithm="SHA256",
            **target,
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
        raise FluxIntegrityError(
            f"s3://{source_bucket}/{image.key} was replaced since its check, or s3://{bucket}/{key} was written "
            "since it was looked at: S3 refused the copy"
        ) from exc


def _entry(image: ManifestImage, bucket: str, key: str, status: ImageStatus, seconds: float | None) -> ManifestImage:
    reason = "already published by an earlier try" if status is ImageStatus.REUSED else None
    update = {"status": status, "reason": reason, "key": key, "s3_uri": f"s3://{bucket}/{key}", "copy_seconds": seconds}
    # The entry is this publish's: the writer fields are the published manifest's, not the staging copy's.
    update |= {"dag_id": None, "run_id": None, "task_id": None, "map_index": None}
    return image.model_copy(update=update)


def _withdraw(
    client: Any, bucket: str, source_prefix: str, prefix: str, rejected: list[ManifestImage], merged: Manifest
) -> list[str]:
    """Delete rejected images that an earlier answer of this review published (the run was
    cleared and answered anew), so the prefix holds what its manifest lists. Only keys holding
    that very image and listed by no other writer of the manifest are deleted, after the
    manifest that no longer lists them."""
    others = {i.key for i in merged.images if i.stored and i.writer != merged.writer}
    plan = [(image, _published_key(str(image.key), source_prefix, prefix)) for image in rejected]
    plan = [(image, key) for image, key in plan if key not in others]
    stale = [
        key for (_, key), dest in zip(plan, _destinations(client, bucket, plan), strict=True) if dest.state == "same"
    ]
    if stale:
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale], "Quiet": True})
    return stale


def _destinations(client: Any, bucket: str, plan: list[tuple[ManifestImage, str]]) -> list[_Destination]:
    """Each planned key as it is now, with its ETag."""
    from botocore.exceptions import ClientError

    found = []
    for image, key in plan:
        try:
            head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if not s3_not_found(exc):
                raise
            found.append(_Destination("free"))
            continue
        same = image.sha256 and whole_object_sha256(head) == image.sha256
        found.append(_Destination("same" if same else "other", str(head["ETag"])))
    return found


def _check_destinations(
    client: Any, bucket: str, plan: list[tuple[ManifestImage, str]], *, replace: bool
) -> list[_Destination]:
    """Before writing anything: each key as it is; refuses keys holding other bytes unless ``replace``."""
    destinations = _destinations(client, bucket, plan)
    clashes = [key for (_, key), dest in zip(plan, destinations, strict=True) if dest.state == "other"]
    if clashes and not replace:
        raise FluxImageExistsError(
            f"Refusing to overwrite existing object(s) in s3://{bucket}: {', '.join(clashes)} "
            "(replace=True overwrites). Nothing was written."
        )
    return destinations


def _report_lineage(
    s3_hook: S3Hook, source: tuple[str, str, str, list[str]], dest: tuple[str, str, str, list[str]]
) -> None:
    """The staged images read and the published ones written, through Airflow's hook lineage
    collector (a publish runs in a TaskFlow task, which has no operator to carry OpenLineage
    facets): each ``(bucket, manifest URI, prefix, keys)`` as the manifest and its images, or the
    manifest and their prefix when they are too many for one event (as the copy does)."""
    from airflow.providers.common.compat.lineage.hook import get_hook_lineage_collector

    from airflow_flux.lineage import named_or_prefix

    collector = get_hook_lineage_collector()
    for (bucket, manifest_uri, prefix, keys), add in (
        (source, collector.add_input_asset),
        (dest, collector.add_output_asset),
    ):
        for key in [split_s3_uri(manifest_uri)[1], *named_or_prefix(keys, f"{prefix.strip('/')}/")]:
            add(context=s3_hook, scheme="s3", asset_kwargs={"bucket": bucket, "key": key})


def _cost(images: list[ManifestImage]) -> float | None:
    costs = [i.cost_usd for i in images if i.cost_usd is not None]
    return round(sum(costs), 6) if costs else None
