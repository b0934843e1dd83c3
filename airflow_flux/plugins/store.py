"""Where the gallery's images come from: the manifests its runs' records name, read from S3.

The api-server has the metadata DB: :mod:`airflow_flux.plugins.records` finds the manifests a
run's copy tasks wrote (checked against each task's own record); this module reads them with
``S3Hook`` and serves only images listed there, so a gallery URL can never name another S3
object. A manifest is not taken on its word either (whoever may write to its bucket can
rewrite it): only its entries written by this run's tasks that share it are shown, and only
keys under the task's prefix in the task's bucket (the manifest's own ``bucket`` is never
followed).

A prefix's manifest may be shared by several tasks, of this run or of others
(:mod:`airflow_flux.manifest`): a run shows the entries its own tasks wrote, each under the
task that wrote it, and a manifest shared by several of its tasks is read once.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow_flux.identity import s3_object_args, split_s3_input
from airflow_flux.manifest import STORED_STATUSES, entry_writer, split_s3_uri

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from airflow_flux.plugins.records import ManifestRef


log = logging.getLogger(__name__)

#: Content types served as such; anything else is sent as a download (never rendered by the browser).
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
MANIFEST_TTL = 30.0
CLIENT_TTL = 600.0
THUMB_SIZE = 480
THUMB_CACHE_BYTES = 64 * 1024 * 1024
#: Larger images get no thumbnail (decoding them would cost the api-server too much).
MAX_THUMBNAIL_SOURCE_BYTES = 40 * 1024 * 1024


class GalleryError(Exception):
    """A manifest or image that cannot be read; the message is safe to show to the user."""


class NoThumbnail(GalleryError):
    """No thumbnail is made: the object is larger than :data:`MAX_THUMBNAIL_SOURCE_BYTES`, or
    Pillow is not installed (it is the ``thumbnails`` extra); the image itself is sent instead."""


def _need_pillow() -> None:
    if importlib.util.find_spec("PIL") is None:
        raise NoThumbnail("Pillow is not installed in the api-server (pip install 'airflow-flux[thumbnails]')")


def _read_at_most(chunks: Iterator[bytes], limit: int) -> bytes:
    """The chunks joined, failing once past ``limit`` bytes (whatever the length said)."""
    out = bytearray()
    try:
        for chunk in chunks:
            out += chunk
            if len(out) > limit:
                raise NoThumbnail("too large for a thumbnail")
    finally:
        _close(chunks)
    return bytes(out)


def _close(chunks: Iterator[bytes]) -> None:
    """Close a stream of chunks (a generator over an S3 body: closing it closes the body)."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


@dataclass
class GalleryImage:
    """One entry of a manifest, with the task that wrote it (``ref``: that task's, read through
    the manifest reference it was found by)."""

    ref: ManifestRef
    bucket: str
    entry: dict[str, Any]

    @property
    def stored(self) -> bool:
        return self.entry.get("status") in STORED_STATUSES and bool(self.entry.get("key"))

    @property
    def sha256(self) -> str | None:
        value = self.entry.get("sha256")
        return str(value) if value else None

    @property
    def key(self) -> str:
        return str(self.entry.get("key") or "")

    @property
    def filename(self) -> str:
        """The object's name, for a download."""
        return self.key.rsplit("/", 1)[-1] or f"{self.sha256}.img"

    @property
    def inputs(self) -> list[str]:
        """The edit's input images as the caller named them (``s3://`` URIs, URLs), in order."""
        value = self.entry.get("inputs")
        return [str(v) for v in value] if isinstance(value, list) else []


@dataclass
class RunGallery:
    """Every image of a run (manifest order), and the manifests that could not be read."""

    run_id: str
    images: list[GalleryImage] = field(default_factory=list)
    errors: list[tuple[ManifestRef, str]] = field(default_factory=list)
    refs: list[ManifestRef] = field(default_factory=list)

    def find(self, sha256: str) -> GalleryImage | None:
        """The stored image with this SHA-256 (same digest, same bytes: any such entry will do)."""
        return next((i for i in self.images if i.stored and i.sha256 == sha256), None)

    @property
    def cost_usd(self) -> float | None:
        """What the run's images cost (each entry's share of its request's cost), or None when none is priced."""
        costs = [float(i.entry["cost_usd"]) for i in self.images if isinstance(i.entry.get("cost_usd"), int | float)]
        return round(sum(costs), 6) if costs else None


def content_disposition(filename: str) -> str:
    """``attachment`` with the file's name (RFC 6266: an ASCII fallback and the UTF-8 name)."""
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _bucket_and_key(uri: str) -> tuple[str, str]:
    """:func:`~airflow_flux.manifest.split_s3_uri`, failing as the gallery's pages show it."""
    try:
        return split_s3_uri(uri)
    except ValueError as exc:
        raise GalleryError(str(exc)) from None


class _TTLCache:
    """A small thread-safe LRU with a time to live, bounded in entries and (optionally) bytes."""

    def __init__(self, ttl: float | None, max_entries: int, max_bytes: int | None = None) -> None:
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self._items: OrderedDict[Any, tuple[float, Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if self.ttl is not None and time.monotonic() - item[0] > self.ttl:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Any, value: Any, size: int = 0) -> None:
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (time.monotonic(), value, size)
            self._bytes += size
            while self._items and (
                len(self._items) > self.max_entries or (self.max_bytes is not None and self._bytes > self.max_bytes)
            ):
                self._drop(next(iter(self._items)))

    def _drop(self, key: Any) -> None:
        _, _, size = self._items.pop(key)
        self._bytes -= size


class GalleryStore:
    """Reads manifests and images from S3, with small caches (the api-server is long-lived).

    :param presigned_expiry: lifetime of presigned URLs, seconds.
    """

    def __init__(self, presigned_expiry: int = 300) -> None:
        self.presigned_expiry = presigned_expiry
        # boto3 clients are thread-safe and costly to build; kept a while (credentials may rotate).
        self._hooks = _TTLCache(ttl=CLIENT_TTL, max_entries=32)
        # A manifest only changes when its task is re-run: a short TTL keeps pages fresh.
        self._manifests = _TTLCache(ttl=MANIFEST_TTL, max_entries=512)
        # Thumbnails are keyed by content digest, so they never go stale.
        self._thumbs = _TTLCache(ttl=None, max_entries=4096, max_bytes=THUMB_CACHE_BYTES)

    def hook(self, conn_id: str) -> Any:
        """An ``S3Hook`` for ``conn_id`` (cached), with short timeouts: a page must not hang on S3.

        :param conn_id: the amazon provider's connection id.
        """
        hook = self._hooks.get(conn_id)
        if hook is None:
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook
            from botocore.config import Config

            hook = S3Hook(
                aws_conn_id=conn_id,
                config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}),
            )
            hook.get_conn()  # resolve the connection now, so a bad one fails here, not mid-stream
            self._hooks.put(conn_id, hook)
        return hook

    def manifest(self, ref: ManifestRef) -> dict[str, Any]:
        """The manifest ``ref`` points at (cached for :data:`MANIFEST_TTL` seconds).

        :param ref: the manifest's reference.
        """
        cached = self._manifests.get((ref.conn_id, ref.uri))
        if cached is not None:
            return cached
        bucket, key = _bucket_and_key(ref.uri)
        try:
            body = self.hook(ref.conn_id).get_conn().get_object(Bucket=bucket, Key=key)["Body"].read()
            manifest = json.loads(body)
        except GalleryError:
            raise
        except Exception as exc:
            log.warning("Flux gallery: cannot read manifest %s (connection %s): %s", ref.uri, ref.conn_id, exc)
            raise GalleryError(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list):
            raise GalleryError("not a FluxToS3Operator manifest (no 'images' list)")
        self._manifests.put((ref.conn_id, ref.uri), manifest)
        return manifest

    def run_gallery(self, run_id: str, refs: list[ManifestRef]) -> RunGallery:
        """Every image the run's manifests list; unreadable or refused manifests are reported, not fatal.

        :param run_id: the run.
        :param refs: its manifests (:meth:`manifest_refs`).
        """
        gallery = RunGallery(run_id=run_id, refs=refs)
        sharing: dict[str, list[ManifestRef]] = {}  # copy tasks sharing one prefix share one manifest
        for ref in refs:
            if ref.refused is not None:
                gallery.errors.append((ref, ref.refused))
            else:
                sharing.setdefault(ref.uri, []).append(ref)
        for owners in sharing.values():
            ref = owners[0]
            try:
                manifest = self.manifest(ref)
            except GalleryError as exc:
                gallery.errors.append((ref, str(exc)))
                continue
            named = manifest.get("bucket")
            if named is not None and named != ref.bucket:
                gallery.errors.append((ref, f"it names bucket {named!r}, not the task's ({ref.bucket!r})"))
                continue
            writers = {(o.dag_id, o.run_id, o.task_id, o.map_index): o for o in owners}
            outside = 0
            for entry in manifest["images"]:
                if not isinstance(entry, dict):
                    continue
                writer = entry_writer(entry, manifest)
                # No writer on record (an old manifest): the one task that names it, if only one does.
                owner = writers.get(writer) if writer is not None else (ref if len(owners) == 1 else None)
                if owner is None:  # another run's, another task's, or a writer no XCom of the run names
                    continue
                image = GalleryImage(ref=owner, bucket=ref.bucket, entry=entry)
                if image.key and ref.prefix and not image.key.startswith(f"{ref.prefix}/"):
                    outside += 1
                    continue
                gallery.images.append(image)
            if outside:
                gallery.errors.append(
                    (
                        ref,
                        f"{outside} entr{'y' if outside == 1 else 'ies'} outside the task's prefix "
                        f"({ref.prefix}/) not shown",
                    )
                )
        return gallery

    def recent_runs(self, runs: Sequence[tuple[str, list[ManifestRef]]]) -> list[RunGallery]:
        """The galleries of ``runs`` (``(run_id, its manifests)``, latest first): a DAG's recent runs."""
        return [self.run_gallery(run_id, refs) for run_id, refs in runs]

    def open_image(self, image: GalleryImage) -> tuple[Iterator[bytes], dict[str, Any]]:
        """Stream an image from S3: ``(chunks, head)`` where head has ContentType and ContentLength.

        :param image: a stored image of a manifest.
        """
        try:
            obj = self.hook(image.ref.conn_id).get_conn().get_object(Bucket=image.bucket, Key=image.key)
        except Exception as exc:
            log.warning("Flux gallery: cannot read s3://%s/%s: %s", image.bucket, image.key, exc)
            raise GalleryError(f"{type(exc).__name__}: {exc}") from None
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(256 * 1024)
            finally:
                body.close()

        return chunks(), obj

    def presigned_url(self, image: GalleryImage, *, download: bool = False) -> str:
        """A short-lived URL of the object itself (``presigned`` delivery); the bucket stays private.

        :param image: a stored image of a manifest.
        :param download: S3 answers with ``Content-Disposition: attachment`` (the download link).
        """
        params = {"Bucket": image.bucket, "Key": image.key}
        if download:
            params["ResponseContentDisposition"] = content_disposition(image.filename)
        url = self.hook(image.ref.conn_id).generate_presigned_url(
            client_method="get_object", params=params, expires_in=self.presigned_expiry
        )
        if not url:
            raise GalleryError("could not presign the image URL")
        return str(url)

    def thumbnail(self, image: GalleryImage, size: int = THUMB_SIZE) -> tuple[bytes, str]:
        """A downscaled copy (JPEG, or PNG when the image has transparency), cached by digest.

        :param image: a stored image of a manifest.
        :param size: the longest side, pixels.
        """
        cache_key = (image.sha256 or f"{image.bucket}/{image.key}", size)
        cached = self._thumbs.get(cache_key)
        if cached is not None:
            return cached
        _need_pillow()
        chunks, head = self.open_image(image)
        # S3's own length, not the manifest's (None for a reused image, and a manifest can lie).
        if int(head.get("ContentLength") or 0) > MAX_THUMBNAIL_SOURCE_BYTES:
            _close(chunks)
            raise NoThumbnail(f"{head.get('ContentLength')} bytes: too large for a thumbnail")
        result = make_thumbnail(_read_at_most(chunks, MAX_THUMBNAIL_SOURCE_BYTES), size)
        self._thumbs.put(cache_key, result, size=len(result[0]))
        return result

    def input_thumbnail(self, image: GalleryImage, uri: str, size: int = THUMB_SIZE) -> tuple[bytes, str]:
        """A thumbnail of one of an edit's ``s3://`` inputs, read with the copy task's connection.

        Only a URI the image's manifest lists gets here (the route looks it up by position), and
        the bytes are always re-encoded: whatever the object is, the browser gets a picture.

        :param image: the edit's output, whose manifest entry lists ``uri`` in ``inputs``.
        :param uri: the input's ``s3://`` URI.
        :param size: the longest side, pixels.
        """
        try:
            bucket, key, version_id, etag = split_s3_input(uri)
        except ValueError as exc:
            raise GalleryError(str(exc)) from None
        # The version that was edited (a pinned URI): by VersionId, or the key only while it
        # still has the ETag that was edited (a replaced input is not shown as the input).
        target = s3_object_args(bucket, key, version_id, etag)
        client = self.hook(image.ref.conn_id).get_conn()
        try:
            head = client.head_object(**target)
        except Exception as exc:
            raise GalleryError(f"{type(exc).__name__}: {exc}") from None
        # Keyed by the object's ETag: an input overwritten under the same key gets a new thumbnail.
        cache_key = ("input", bucket, key, str(head.get("ETag")), size)
        cached = self._thumbs.get(cache_key)
        if cached is not None:
            return cached
        if int(head.get("ContentLength") or 0) > MAX_THUMBNAIL_SOURCE_BYTES:
            raise NoThumbnail("too large for a thumbnail")
        _need_pillow()
        try:
            body = client.get_object(**target)["Body"]
            try:
                data = body.read(MAX_THUMBNAIL_SOURCE_BYTES + 1)
            finally:
                body.close()
        except Exception as exc:
            raise GalleryError(f"{type(exc).__name__}: {exc}") from None
        if len(data) > MAX_THUMBNAIL_SOURCE_BYTES:  # replaced by a larger object since the HEAD
            raise NoThumbnail("too large for a thumbnail")
        result = make_thumbnail(data, size)
        self._thumbs.put(cache_key, result, size=len(result[0]))
        return result


def make_thumbnail(data: bytes, size: int = THUMB_SIZE) -> tuple[bytes, str]:
    """``data`` downscaled to ``size`` pixels on its longest side: ``(bytes, content type)``.

    :param data: an encoded image.
    :param size: the longest side, pixels.
    """
    from PIL import Image

    try:
        picture = Image.open(io.BytesIO(data))
        # JPEG decodes straight at a reduced scale (DCT scaling): much faster than decode + resize.
        picture.draft("RGB", (size, size))
        picture.thumbnail((size, size))
        out = io.BytesIO()
        if picture.mode in ("RGBA", "LA", "P"):
            picture.save(out, format="PNG", optimize=True)
            return out.getvalue(), "image/png"
        picture.convert("RGB").save(out, format="JPEG", quality=82, optimize=True)
        return out.getvalue(), "image/jpeg"
    except Exception as exc:
        raise GalleryError(f"not a readable image: {exc}") from None
