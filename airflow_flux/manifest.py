"""The manifest a copy to S3 writes beside its images, typed once for the writers and the readers.

A leaf module (its reading and writing in S3, streamed, is :mod:`airflow_flux.manifest_store`):
:class:`~airflow_flux.transfers.FluxToS3Operator` and
:func:`~airflow_flux.transfers.publish_images` write it, the Flux gallery
(:mod:`airflow_flux.plugins.store`) and other jobs read it. Its JSON keys are the
contract: ``version`` changes if a key's meaning does.

Several tasks may copy into one prefix (two copy tasks of a run, mapped copies, a retry), so
the manifest at ``{prefix}/{manifest_name}`` is the prefix's, shared by its writers (a writer is
one task instance: ``dag_id``, ``run_id``, ``task_id``, ``map_index``). A writer never replaces
it: :func:`~airflow_flux.manifest_store.write_manifest` reads it, keeps the other writers' entries, puts its own in place of
its earlier ones (a retry or a clear rewrites them rather than adding copies) and drops the
other writers' entries at keys it has just written (those objects were overwritten; one it
found holding its very image and left as it was stays listed by both), then writes
it back under an S3 precondition (``If-Match`` the ETag it read, ``If-None-Match: *`` when there
was none). A writer that lost the race re-reads and merges again. Per-task manifest names were
the alternative; they would leave every reader (the gallery, ``publish_images``, jobs that read
``manifest.json``) to find and join several files, and a prefix with one file is what people
and downstream jobs already read. A store that ignores conditional writes still merges, but two
writes at the very same moment can then lose one writer's entries.

Version 2 (this module) gives each entry its writer and adds ``writers``; the top-level
``dag_id``, ``run_id``, ``task_id``, ``map_index`` and ``created_at`` name the last writer and
when it wrote, and ``cost_usd`` is the sum over ``writers``. A version-1 manifest (one writer)
reads as a version-2 one: its entries and its one writer take the top-level fields.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

MANIFEST_VERSION = 2

#: A writer of a manifest: ``(dag_id, run_id, task_id, map_index)``.
WriterKey = tuple[str, str, str, int]


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
    """One image of the manifest, copied or not, and the task that wrote its entry."""

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
    #: The task instance that wrote this entry (set in every written manifest; None only while
    #: an entry is built, before it goes into a :class:`Manifest`).
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int | None = None

    @property
    def stored(self) -> bool:
        """Whether the entry has an object in S3."""
        return self.status.value in STORED_STATUSES and bool(self.key)

    @property
    def writer(self) -> WriterKey | None:
        if self.dag_id is None or self.run_id is None or self.task_id is None or self.map_index is None:
            return None
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


class ManifestWriter(BaseModel):
    """One task instance that wrote into the manifest: when it last did, and what its requests cost."""

    model_config = ConfigDict(defer_build=True)

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    created_at: str
    #: What the requests behind its images cost, US dollars (None: no price known).
    cost_usd: float | None = None

    @property
    def key(self) -> WriterKey:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


class Manifest(BaseModel):
    """``manifest.json``: every image its writers planned, each entry naming its writer.

    Built by one writer (its entries without a writer take the top-level one), it is that
    writer's part; :func:`merge` (in S3: :func:`~airflow_flux.manifest_store.write_manifest`)
    joins it with what the prefix's manifest already holds.
    """

    model_config = ConfigDict(defer_build=True)

    version: int = MANIFEST_VERSION
    #: When the last writer wrote.
    created_at: str
    #: The last writer (in a version-1 manifest, the only one).
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    bucket: str
    prefix: str
    images: list[ManifestImage]
    #: What the requests behind these images cost in all, US dollars: the sum over ``writers``
    #: (None: no price known).
    cost_usd: float | None = None
    #: Every writer with an entry here (version 2; a version-1 manifest's is its top-level one).
    writers: list[ManifestWriter] = []

    @model_validator(mode="after")
    def _writer_of_unattributed_entries(self) -> Manifest:
        # A version-1 manifest, or one writer's own part being built: the top-level writer wrote it.
        top = {"dag_id": self.dag_id, "run_id": self.run_id, "task_id": self.task_id, "map_index": self.map_index}
        if not self.writers:
            self.writers = [ManifestWriter(**top, created_at=self.created_at, cost_usd=self.cost_usd)]
        self.images = [i if i.writer else i.model_copy(update=top) for i in self.images]
        return self

    @property
    def writer(self) -> WriterKey:
        """The top-level writer (the last one)."""
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


def entry_writer(entry: dict[str, Any], manifest: dict[str, Any]) -> WriterKey | None:
    """The writer of one entry of a manifest read as plain JSON (a reader that does not validate
    it, as the gallery): the entry's own, else the manifest's top-level (version 1), else None.

    :param entry: an item of the manifest's ``images``.
    :param manifest: the manifest.
    """
    for source in (entry, manifest):
        values = [source.get(k) for k in ("dag_id", "run_id", "task_id", "map_index")]
        if all(isinstance(v, str) for v in values[:3]) and isinstance(values[3], int):
            return (str(values[0]), str(values[1]), str(values[2]), int(values[3]))
    return None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``; a ValueError for anything else.

    :param uri: an ``s3://`` URI (a manifest's own, or one of its entries').
    """
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def merged_images(
    existing: Iterable[ManifestImage],
    own: Iterable[ManifestImage],
    me: WriterKey,
    overwrites: Callable[[str], bool],
    had: set[WriterKey | None],
    kept: set[WriterKey | None],
) -> Iterator[ManifestImage]:
    """The merge rule, entry by entry: what a writer's part joined with the manifest lists.

    The other writers' entries are kept, in their order, except those at a key ``own`` has
    copied to (the object they list was overwritten). ``own``'s entries take the place of its
    writer's earlier ones, so a retry keeps the image numbers readers were shown; a new
    writer's go last. A generator, so a manifest of 100,000 entries streams through it.

    :param existing: the entries of the manifest already there.
    :param own: this writer's entries (iterated once).
    :param me: this writer.
    :param overwrites: whether this writer copied to a key (its ``copied`` entries').
    :param had: filled with the writers of ``existing``'s entries.
    :param kept: filled with the writers of the other entries yielded.
    """
    placed = False
    for image in existing:
        had.add(image.writer)
        if image.writer == me:
            if not placed:
                yield from own
                placed = True
        elif not (image.stored and image.key and overwrites(image.key)):
            kept.add(image.writer)
            yield image
    if not placed:
        yield from own


def merged_writers(
    existing: list[ManifestWriter],
    own: list[ManifestWriter],
    me: WriterKey,
    had: set[WriterKey | None],
    kept: set[WriterKey | None],
) -> tuple[list[ManifestWriter], float | None]:
    """The writers of a merged manifest (:func:`merged_images` filled ``had`` and ``kept``) and its cost."""
    # A writer all of whose entries were overwritten is no longer behind any image here.
    writers = [w for w in existing if w.key != me and (w.key in kept or w.key not in had)]
    writers += own
    costs = [w.cost_usd for w in writers if w.cost_usd is not None]
    return writers, (round(sum(costs), 6) if costs else None)


def merge(existing: Manifest | None, own: Manifest) -> Manifest:
    """``own`` (one writer's part) joined with the manifest already at its key, in memory; pure.

    :param existing: the manifest read from S3, or None.
    :param own: this writer's entries and top-level fields.
    """
    if existing is None:
        return own
    me = own.writer
    overwritten = {i.key for i in own.images if i.status is ImageStatus.COPIED and i.key}
    had: set[WriterKey | None] = set()
    kept: set[WriterKey | None] = set()
    images = list(merged_images(existing.images, own.images, me, overwritten.__contains__, had, kept))
    writers, cost = merged_writers(existing.writers, own.writers, me, had, kept)
    update = {"version": MANIFEST_VERSION, "images": images, "writers": writers, "cost_usd": cost}
    return own.model_copy(update=update)
