"""A prefix's manifest in S3, read and written through temporary files, never whole in memory.

A leaf module beside :mod:`airflow_flux.manifest` (the document and its merge rule). A
batch's copy lists up to 100,000 images, so neither side of a merge is held in memory:

- the writer's own entries are spooled to a temporary SQLite file as they are made
  (:class:`ManifestPart`), indexed by key for the "was this key overwritten" question;
- the manifest already in S3 is downloaded to a temporary file and read entry by entry with
  ijson (:func:`read_stored`);
- the merged document is written entry by entry to another temporary file, which is PUT under
  the S3 precondition (``If-Match`` the ETag read, ``If-None-Match: *`` when there was none); a
  writer that lost the race reads and merges again.

The document written is the one :class:`~airflow_flux.manifest.Manifest` describes, one entry
per line, so ``json.load`` and every reader of version 2 read it as before.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from airflow_flux.exceptions import FluxError, FluxImageExistsError, s3_not_found
from airflow_flux.manifest import (
    MANIFEST_VERSION,
    Manifest,
    ManifestImage,
    ManifestWriter,
    WriterKey,
    merged_images,
    merged_writers,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

#: How many times a writer re-reads and merges after losing a race for the manifest.
MERGE_ATTEMPTS = 10

#: The manifest's top-level scalar fields, in the order they are written (then images, cost, writers).
_HEADER = ("version", "created_at", "dag_id", "run_id", "task_id", "map_index", "bucket", "prefix")


class ManifestPart:
    """One writer's own part of a manifest, its entries spooled to disk as they are made.

    Use as a context manager (the temporary files go with it). Not thread-safe: one thread adds.

    :param dag_id: the writing task instance's DAG...
    :param run_id: ...run...
    :param task_id: ...task...
    :param map_index: ...and map index.
    :param bucket: the manifest's bucket.
    :param prefix: the prefix it lists.
    :param created_at: when it is written (default: now).
    """

    def __init__(
        self,
        *,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int,
        bucket: str,
        prefix: str,
        created_at: str | None = None,
    ) -> None:
        self.writer: WriterKey = (dag_id, run_id, task_id, map_index)
        self.bucket, self.prefix = bucket, prefix
        self.created_at = created_at or datetime.now(timezone.utc).isoformat()
        #: What the requests behind its entries cost, US dollars (None: no price known).
        self.cost_usd: float | None = None
        self.count = 0
        self._dir = tempfile.TemporaryDirectory(prefix="flux-manifest-")
        self.directory = Path(self._dir.name)
        self._db = sqlite3.connect(self.directory / "part.sqlite")
        self._db.execute("CREATE TABLE entry (seq INTEGER PRIMARY KEY, key TEXT, status TEXT, body TEXT)")
        self._db.execute("CREATE INDEX copied_key ON entry (key) WHERE status = 'copied'")

    @classmethod
    def of(cls, manifest: Manifest) -> ManifestPart:
        """A part holding a manifest built in memory (a few entries: a publish, a test)."""
        dag_id, run_id, task_id, map_index = manifest.writer
        part = cls(
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            map_index=map_index,
            bucket=manifest.bucket,
            prefix=manifest.prefix,
            created_at=manifest.created_at,
        )
        part.cost_usd = manifest.cost_usd
        part.add(manifest.images)
        return part

    def add(self, entries: Iterable[ManifestImage]) -> None:
        """Spool entries (those without a writer take this part's)."""
        dag_id, run_id, task_id, map_index = self.writer
        top = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index}
        rows = []
        for entry in entries:
            entry = entry if entry.writer else entry.model_copy(update=top)
            rows.append((entry.key, entry.status.value, entry.model_dump_json()))
        self._db.executemany("INSERT INTO entry (key, status, body) VALUES (?, ?, ?)", rows)
        self.count += len(rows)

    def __iter__(self) -> Iterator[ManifestImage]:
        for (body,) in self._db.execute("SELECT body FROM entry ORDER BY seq"):
            yield ManifestImage.model_validate_json(body)

    def overwrites(self, key: str) -> bool:
        """Whether this part copied to ``key`` (the object another writer listed there is gone)."""
        found = self._db.execute("SELECT 1 FROM entry WHERE status = 'copied' AND key = ?", (key,)).fetchone()
        return found is not None

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()

    def __enter__(self) -> ManifestPart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoredManifest(BaseModel):
    """What is at a manifest's key: its ETag (None: nothing) and a file holding the manifest,
    or why it is none."""

    etag: str | None = None
    #: The downloaded manifest (valid: its entries are read from here by :meth:`images`).
    path: Path | None = None
    #: Its top-level fields and writers, validated (its ``images`` left empty).
    header: Manifest | None = None
    #: Set when an object is there but is not a manifest this version may merge into.
    problem: str | None = None

    def images(self) -> Iterator[ManifestImage]:
        """Its entries, streamed from the file (a version-1 entry takes the top-level writer)."""
        import ijson

        if self.path is None or self.header is None:
            return
        dag_id, run_id, task_id, map_index = self.header.writer
        top = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index}
        with self.path.open("rb") as f:
            for item in ijson.items(f, "images.item", use_float=True):
                image = ManifestImage.model_validate(item)
                yield image if image.writer else image.model_copy(update=top)


def read_stored(client: Any, bucket: str, key: str, directory: Path) -> StoredManifest:
    """The object at a manifest's key, downloaded into ``directory`` and checked entry by entry.

    :param client: a boto3 S3 client.
    :param bucket: the bucket.
    :param key: the manifest's key.
    :param directory: where the download goes (a :class:`ManifestPart`'s, or a temporary one).
    """
    import ijson
    from botocore.exceptions import ClientError

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if s3_not_found(exc):
            return StoredManifest()
        raise
    etag, path = str(obj["ETag"]), directory / "stored.json"
    with path.open("wb") as f:
        shutil.copyfileobj(obj["Body"], f, 1 << 20)
    header: dict[str, Any] = {}
    try:
        with path.open("rb") as f:
            events = ijson.parse(f, use_float=True)
            if next(events, (None, None, None))[1] != "start_map":
                return StoredManifest(etag=etag, problem="not a manifest (not a JSON object)")
            for prefix, event, value in events:
                if prefix in (*_HEADER, "cost_usd") and event not in ("start_map", "start_array", "map_key"):
                    header[prefix] = value
        with path.open("rb") as f:
            header["writers"] = list(ijson.items(f, "writers.item", use_float=True))
        version = header.get("version")
        if isinstance(version, int) and version > MANIFEST_VERSION:
            # Merging would drop whatever the newer format added.
            return StoredManifest(etag=etag, problem=f"a version-{version} manifest, newer than this airflow-flux")
        errors, checked = 0, None
        try:
            checked = Manifest.model_validate({**header, "images": []})
        except ValidationError as exc:
            errors += exc.error_count()
        with path.open("rb") as f:
            for item in ijson.items(f, "images.item", use_float=True):
                try:
                    ManifestImage.model_validate(item)
                except ValidationError as exc:
                    errors += exc.error_count()
    except ijson.JSONError:
        return StoredManifest(etag=etag, problem="not a manifest (not JSON)")
    if errors or checked is None:
        return StoredManifest(etag=etag, problem=f"not a manifest ({errors} schema error(s))")
    return StoredManifest(etag=etag, path=path, header=checked)


def check_manifest_key(client: Any, bucket: str, key: str, *, replace: bool) -> None:
    """Refuse a manifest key holding something that is not a manifest, unless ``replace``.

    :param client: a boto3 S3 client.
    :param bucket: the bucket.
    :param key: the manifest's key.
    :param replace: overwrite such an object.
    """
    with tempfile.TemporaryDirectory(prefix="flux-manifest-") as directory:
        stored = read_stored(client, bucket, key, Path(directory))
    if stored.problem and not replace:
        raise FluxImageExistsError(
            f"Refusing to overwrite s3://{bucket}/{key}: {stored.problem} (replace=True overwrites it)"
        )


class WrittenManifest(BaseModel):
    """What :func:`write_manifest` wrote: how many entries and writers, and the file it PUT."""

    images: int
    writers: list[ManifestWriter]
    path: Path

    def load(self) -> Manifest:
        """The manifest written, in memory (for small ones: before its part is closed)."""
        return Manifest.model_validate_json(self.path.read_bytes())


def _write_merged(path: Path, stored: StoredManifest, part: ManifestPart) -> WrittenManifest:
    """The merged document into ``path``, one entry per line."""
    me = part.writer
    own_writer = ManifestWriter(
        dag_id=me[0], run_id=me[1], task_id=me[2], map_index=me[3], created_at=part.created_at, cost_usd=part.cost_usd
    )
    had: set[WriterKey | None] = set()
    kept: set[WriterKey | None] = set()
    header = dict(zip(_HEADER, (MANIFEST_VERSION, part.created_at, *me, part.bucket, part.prefix), strict=True))
    count = 0
    with path.open("w", encoding="utf-8") as f:
        f.write("{\n" + "".join(f"  {json.dumps(k)}: {json.dumps(v)},\n" for k, v in header.items()))
        f.write('  "images": [')
        for image in merged_images(stored.images(), part, me, part.overwrites, had, kept):
            f.write(("," if count else "") + "\n    " + image.model_dump_json())
            count += 1
        writers, cost = merged_writers(stored.header.writers if stored.header else [], [own_writer], me, had, kept)
        f.write(f'\n  ],\n  "cost_usd": {json.dumps(cost)},\n  "writers": [')
        f.write(",".join("\n    " + w.model_dump_json() for w in writers) + "\n  ]\n}\n")
    return WrittenManifest(images=count, writers=writers, path=path)


def write_manifest(client: Any, part: ManifestPart, key: str, *, replace: bool = False) -> WrittenManifest:
    """Merge ``part`` into the manifest at ``key`` of its bucket under an S3 precondition,
    re-reading after a lost race; streamed through files in the part's directory.

    :param client: a boto3 S3 client.
    :param part: this writer's part (its ``bucket`` is where it goes).
    :param key: the manifest's key.
    :param replace: overwrite an object there that is not a manifest (else refused).
    """
    from botocore.exceptions import ClientError

    for attempt in range(MERGE_ATTEMPTS):
        stored = read_stored(client, part.bucket, key, part.directory)
        if stored.problem and not replace:
            raise FluxImageExistsError(
                f"Refusing to overwrite s3://{part.bucket}/{key}: {stored.problem} (replace=True overwrites it)"
            )
        if stored.problem:  # replaced: nothing of it is merged
            stored = StoredManifest(etag=stored.etag)
        written = _write_merged(part.directory / "merged.json", stored, part)
        condition = {"IfMatch": stored.etag} if stored.etag else {"IfNoneMatch": "*"}
        try:
            with written.path.open("rb") as body:
                client.put_object(
                    Bucket=part.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/json",
                    ChecksumAlgorithm="SHA256",
                    **condition,
                )
            return written
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            # 412: another writer got there first; 409: at the same moment; 404 (If-Match): it was deleted.
            if code not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                raise
        # Jittered, so writers that collided do not collide again in step.
        time.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))
    raise FluxError(
        f"s3://{part.bucket}/{key} changed under each of {MERGE_ATTEMPTS} attempts to merge this task's "
        "entries into it; its images are in S3 and a retry of the task merges them again"
    )


def merge_manifest(client: Any, own: Manifest, key: str, *, replace: bool = False) -> Manifest:
    """:func:`write_manifest` for a part built in memory; the manifest written, in memory.

    :param client: a boto3 S3 client.
    :param own: this writer's part (its ``bucket`` is where it goes).
    :param key: the manifest's key.
    :param replace: overwrite an object there that is not a manifest (else refused).
    """
    with ManifestPart.of(own) as part:
        return write_manifest(client, part, key, replace=replace).load()
