"""FluxToS3Operator: stream generated images into S3, with metadata and a manifest."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import cached_property
from itertools import islice
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_flux.exceptions import (
    FluxError,
    FluxIntegrityError,
    FluxTransportError,
)
from airflow_flux.identity import DEFAULT_CONN_ID, coerce_handle, conn_id_for
from airflow_flux.lineage import FluxLineage, FluxLineageMixin, named_or_prefix
from airflow_flux.links import FluxCopiedImagesLink
from airflow_flux.manifest import ImageStatus, ManifestImage
from airflow_flux.manifest_store import ManifestPart, check_manifest_key, write_manifest
from airflow_flux.metrics import images_copied
from airflow_flux.models import FluxResult, cost_usd
from airflow_flux.transfers.planning import (
    ImageJob,
    NsfwPolicy,
    check_destinations,
    check_nsfw_policy,
    failed_entry,
    plan_images,
    sniff_content_type,
)
from airflow_flux.transfers.s3stream import MAX_SINGLE_PUT
from airflow_flux.xcom_keys import MANIFEST_XCOM_KEY

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from airflow.sdk import Context

    from airflow_flux.hooks.download import ImageStream
    from airflow_flux.hooks.flux import FluxHook


#: A prefix that is defined for every run, manual ones included ({{ ds }} is not, in Airflow 3).
DEFAULT_PREFIX = "flux/{{ dag.dag_id }}/{{ run_id }}"
DEFAULT_KEY_TEMPLATE = "{request_id}_{index}.{ext}"
#: Past this many images: progress lines, not one per image; their prefix as lineage dataset.
MANY_IMAGES = 100
#: Seconds between progress lines.
PROGRESS_INTERVAL = 10.0
#: Results planned, checked and copied at a time (a batch's results file is read this way).
CHUNK = 500

# Multipart defaults (images of unknown size or above max_single_put): (upload_concurrency
# + 1) part buffers at most; the next part downloads while the previous one uploads. On
# loopback, 2 uploads at once were no faster than 1 and held one part more (bench/).
PART_SIZE = 8 * 1024 * 1024
UPLOAD_CONCURRENCY = 1


def _total_cost(jobs: list[ImageJob]) -> float | None:
    """What the requests behind ``jobs`` cost (each counted once), or None when none has a price."""
    costs = {id(j.result): j.result.cost_usd for j in jobs if j.result.cost_usd is not None}
    return round(sum(costs.values()), 6) if costs else None


class FluxToS3Operator(FluxLineageMixin, BaseOperator):
    """Copy the images of FLUX results into S3, streaming, with metadata and a manifest.

    Each image is streamed from its URL (no token sent; only from the connection's own host,
    fal's media CDN and its ``allowed_image_hosts``, redirects included; at most its
    ``max_image_mib``) or its ``data:`` URI into S3,
    never held whole in memory: as one PUT while it downloads, its SHA-256 sent after the
    body for S3 to verify (a multipart upload when the size is unknown or above
    ``max_single_put``). Its type is checked against its first bytes, its size against
    ``Content-Length``, and a SHA-256 is stored both as the S3 checksum and in the
    manifest. A failed copy leaves no object behind: a broken PUT stores nothing, a broken
    multipart upload is aborted, and objects this try already wrote are deleted, so a retry
    starts clean.

    Returns the ``s3://`` URIs of the copied images; for a batch's summary, a summary too
    (``kind`` ``flux_copy``: the manifest's URI and counts), whatever the batch's size. Objects get metadata (``flux-request-id``,
    ``flux-seed``, ``flux-endpoint``, size, prompt digest, and the URL-encoded prompt when
    it fits); the manifest (JSON) lists every image, copied or skipped. Copy tasks sharing a
    prefix share its manifest: each merges its entries in (:mod:`airflow_flux.manifest`).

    :param source: a result of ``FluxStatusSensor``/``FluxGenerateOperator`` (preferred: no API
        call), a submit handle (the result is fetched from its ``response_url``), a list of
        either (mapped upstreams, a batch), or a batch's summary (its results file is read,
        if a task of this DAG run wrote it).
    :param s3_bucket: destination bucket.
    :param s3_key_prefix: key prefix; the default is per DAG run (uses ``run_id``, which
        manual runs have too, unlike ``{{ ds }}``).
    :param image_key_template: name of each image under the prefix; ``str.format`` fields:
        ``request_id``, ``index``, ``seed``, ``ext``.
    :param manifest_name: name of the manifest under the prefix, shared with the other tasks
        copying there; None to write none.
    :param aws_conn_id: the amazon provider's connection (``endpoint_url`` in its extra
        targets MinIO, moto or any S3-compatible store).
    :param flux_conn_id: the ``flux`` connection of handles in ``source``; by default each
        handle's own (the one it was submitted with), else ``flux_default``. One that differs
        from a handle's wins, with a warning. Its ``allowed_image_hosts`` apply to the images
        (by default those of the connection each result or handle names).
    :param replace: overwrite existing keys; when off (default), an existing key that is
        not this very image, or a manifest key holding something that is not a manifest, fails
        the task before anything is written.
    :param nsfw_policy: per image flagged by ``has_nsfw_concepts``: ``skip`` (default;
        listed in the manifest as skipped), ``fail`` the task, or ``keep`` it.
    :param max_workers: images copied at once.
    :param part_size: images up to this size are buffered and sent with their SHA-256 in
        the metadata too; also the bytes per multipart part (min 5 MiB).
    :param upload_concurrency: parts of one image uploaded at once in a multipart upload;
        its memory is about ``(upload_concurrency + 1) * part_size``.
    :param max_single_put: largest image streamed as one PUT (S3 allows 5 GiB); larger
        ones, and those of unknown size, go as a multipart upload.
    """

    template_fields: Sequence[str] = (
        "source",
        "s3_bucket",
        "s3_key_prefix",
        "image_key_template",
        "manifest_name",
        "aws_conn_id",
        "flux_conn_id",
        "nsfw_policy",
    )
    ui_color = "#f7e1c8"
    operator_extra_links = (FluxCopiedImagesLink(),)

    def __init__(
        self,
        *,
        source: Any,
        s3_bucket: str,
        s3_key_prefix: str = DEFAULT_PREFIX,
        image_key_template: str = DEFAULT_KEY_TEMPLATE,
        manifest_name: str | None = "manifest.json",
        aws_conn_id: str | None = "aws_default",
        flux_conn_id: str | None = None,
        replace: bool = False,
        nsfw_policy: NsfwPolicy = "skip",
        max_workers: int = 4,
        part_size: int = PART_SIZE,
        upload_concurrency: int = UPLOAD_CONCURRENCY,
        max_single_put: int = MAX_SINGLE_PUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if "{{" not in str(nsfw_policy):
            check_nsfw_policy(nsfw_policy)
        if max_workers < 1:
            raise ValueError(f"max_workers: must be at least 1 (got {max_workers!r})")
        self.source = source
        self.s3_bucket = s3_bucket
        self.s3_key_prefix = s3_key_prefix
        self.image_key_template = image_key_template
        self.manifest_name = manifest_name
        self.aws_conn_id = aws_conn_id
        self.flux_conn_id = flux_conn_id
        self.replace = replace
        self.nsfw_policy = nsfw_policy
        self.max_workers = max_workers
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.max_single_put = max_single_put

    @cached_property
    def flux_hook(self) -> FluxHook:
        """The hook of the task's connection (``flux_conn_id``, else ``flux_default``): downloads
        of results that name no connection of their own follow its ``allowed_image_hosts``."""
        from airflow_flux.hooks.flux import FluxHook

        return FluxHook(flux_conn_id=self.flux_conn_id or DEFAULT_CONN_ID)

    def _image_hook(self, job: ImageJob) -> FluxHook:
        """The hook that downloads ``job``'s image, whose connection's allow-list applies: the
        one the result was made with (recorded in it, as in a handle), unless the task names one."""
        conn_id, _ = conn_id_for({"flux_conn_id": job.result.flux_conn_id}, self.flux_conn_id)
        return self.flux_hook if conn_id == (self.flux_conn_id or DEFAULT_CONN_ID) else self._api_hook(conn_id)

    def _check_image_hosts(self, jobs: list[ImageJob]) -> None:
        """Refuse an image on a host its connection does not allow, before anything is contacted
        or written (redirects and addresses are checked again as the download goes)."""
        for job in jobs:
            if not job.url.startswith("data:"):
                self._image_hook(job).image_policy.check_url(job.url)

    @cached_property
    def _api_hooks(self) -> dict[str, FluxHook]:
        return {}

    def _api_hook(self, conn_id: str) -> FluxHook:
        """A hook per connection: mapped upstreams may have submitted with several."""
        from airflow_flux.hooks.flux import FluxHook

        if conn_id not in self._api_hooks:
            self._api_hooks[conn_id] = FluxHook(flux_conn_id=conn_id)
        return self._api_hooks[conn_id]

    @cached_property
    def s3_hook(self) -> S3Hook:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=self.aws_conn_id)

    # -- planning ----------------------------------------------------------------------------

    def _sources(self) -> list[Any]:
        source = self.source
        if isinstance(source, str | bytes | Mapping):
            return [source]
        try:
            # A slice, not iteration: a mapped upstream's lazy XCom sequence then fetches
            # every item in one request (iterating probes one past the end, logging an error).
            return list(source[:])
        except TypeError:
            try:
                return list(source)
            except TypeError:
                return [source]

    def _items(self, context: Context) -> Iterator[Any]:
        """The source's items; a batch's results file (its summary) read line by line."""
        from airflow_flux.results import BatchResultsSummary, read_results

        for item in self._sources():
            if BatchResultsSummary.is_summary(item):
                # Read only if a task of this DAG run wrote it: the XCom may not be the batch's.
                self._from_summary = True
                ti = context["ti"]
                yield from read_results(
                    self.s3_hook.get_conn(), item["results_uri"], dag_id=ti.dag_id, run_id=ti.run_id
                )
            else:
                yield item

    def _results(self, context: Context) -> tuple[list[FluxResult], list[ManifestImage]]:
        return self._results_of(self._items(context))

    def _results_of(self, items: Iterable[Any]) -> tuple[list[FluxResult], list[ManifestImage]]:
        """The results to copy, and the manifest entries of failed requests (a batch's)."""
        results = []
        failed: list[ManifestImage] = []
        for item in items:
            if isinstance(item, Mapping) and item.get("status") == "failed":
                # A failed request of a batch: nothing to copy, but the manifest says so.
                failed.append(failed_entry(item))
                continue
            if isinstance(item, Mapping) and "images" in item:
                results.append(FluxResult.model_validate(dict(item)))
                continue
            # A submit handle (or request id): fetch the result, as the design's
            # "copy the images from response_url", with the connection it was submitted
            # with. fal keeps it for one hour.
            handle = coerce_handle(item)
            conn_id, warning = conn_id_for(handle, self.flux_conn_id)
            if warning:
                self.log.warning(warning)
            hook = self._api_hook(conn_id)
            result = hook.get_result(handle)
            endpoint = handle.get("endpoint")
            cost = cost_usd(endpoint, result.images, billable_units=result.billable_units, prices=hook.settings.prices)
            results.append(
                result.model_copy(
                    update={
                        "endpoint": endpoint,
                        "inputs": handle.get("inputs"),
                        "cost_usd": cost,
                        "flux_conn_id": conn_id,
                    }
                )
            )
        return results, failed

    def _plan(self, results: list[FluxResult]) -> list[ImageJob]:
        return plan_images(results, prefix=self.s3_key_prefix, key_template=self.image_key_template)

    # -- copying -------------------------------------------------------------------------------

    def _copy(self, job: ImageJob) -> None:
        """Stream one image into S3; retried as a whole on transient download failures."""
        started = time.monotonic()

        hook = self._image_hook(job)

        def attempt() -> None:
            with hook.open_image(job.url) as stream:
                self._upload(job, stream)

        hook.retry_policy.call(attempt)
        job.status, job.seconds = ImageStatus.COPIED, round(time.monotonic() - started, 3)

    def _upload(self, job: ImageJob, stream: ImageStream) -> None:
        from airflow_flux.transfers.s3stream import StreamNotResendableError, stream_to_s3

        actual = sniff_content_type(stream.peek(16))
        expected = job.content_type or stream.content_type
        if actual is None or (expected and expected.startswith("image/") and actual != expected):
            raise FluxIntegrityError(
                f"Image {job.index} of request {job.request_id} is not a valid "
                f"{expected or 'image'}: its bytes say {actual or 'unknown format'}"
            )
        client = self.s3_hook.get_conn()
        try:
            mode = stream_to_s3(
                client,
                stream.read,
                bucket=self.s3_bucket,
                key=job.key,
                size_hint=stream.content_length,
                extra_args={"ContentType": actual, "Metadata": job.metadata},
                part_size=self.part_size,
                concurrency=self.upload_concurrency,
                digest_metadata_key="flux-sha256",
                max_single_put=self.max_single_put,
                sha256=lambda: stream.sha256,
            )
        except StreamNotResendableError as exc:
            # botocore would have retried but cannot rewind a download: a transport error
            # makes the download retry policy copy the image again. Nothing was stored.
            raise FluxTransportError(f"Upload to S3 broke: {exc}") from exc
        # Small (buffered) objects carry their SHA-256 as S3 checksum and in the metadata;
        # streamed ones as S3 checksum only (a trailer: known too late for the metadata);
        # multipart ones a SHA-256 per part (S3 checked each on receipt). The whole-object
        # digest of what was read goes to the manifest. (A server-side self-copy to stamp it on
        # multipart objects too cost a sizeable share of the copy: not worth it, bench/ANALYSIS.md.)
        job.size, job.sha256, job.content_type = stream.bytes_read, stream.sha256, actual
        self.log.debug("s3://%s/%s uploaded (%s)", self.s3_bucket, job.key, mode)

    def _rollback(self, created: list[str], kept: int) -> None:
        # Only objects this try created: one it overwrote (replace=True) existed before, and
        # deleting it would lose what was there as well (it now holds this try's image, which
        # the retry writes again).
        if kept:
            self.log.warning("Keeping %d object(s) this try overwrote (replace=True): they existed before", kept)
        client = self.s3_hook.get_conn()
        if created:
            self.log.warning("Deleting %d object(s) this try created, so a retry starts clean", len(created))
        for start in range(0, len(created), 1000):  # S3 deletes at most 1,000 keys per call
            chunk = created[start : start + 1000]
            client.delete_objects(Bucket=self.s3_bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})

    # -- execute ------------------------------------------------------------------------------

    def execute(self, context: Context) -> list[str] | dict[str, Any]:
        check_nsfw_policy(self.nsfw_policy)
        self._from_summary = False
        if self.manifest_name:
            check_manifest_key(self.s3_hook.get_conn(), self.s3_bucket, self._manifest_key, replace=self.replace)
        if not self.manifest_name:
            return self._copy_into(None, context)
        ti = context["ti"]
        # The manifest's entries go to disk as they are made: a batch's copy lists 100,000.
        part = ManifestPart(
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=-1 if ti.map_index is None else ti.map_index,
            bucket=self.s3_bucket,
            prefix=self.s3_key_prefix.strip("/"),
        )
        with part:
            return self._copy_into(part, context)

    def _copy_into(self, part: ManifestPart | None, context: Context) -> list[str] | dict[str, Any]:
        created: list[str] = []  # what a failure deletes, in every chunk so far
        uris: list[str] = []
        stored = kept = failed_count = skipped = 0
        cost: float | None = None
        items = self._items(context)
        lineage = self.flux_lineage = FluxLineage()
        try:
            # CHUNK results at a time: a batch's results file may have 100,000 lines, and what
            # is kept of a chunk once copied is its manifest entries (on disk) and the keys it created.
            while chunk := list(islice(items, CHUNK)):
                results, failed = self._results_of(chunk)
                jobs = self._copy_all(results, created)
                for result in results:  # the edits' inputs, and the requests that made these images
                    lineage.add_request(result.model_dump(include={"request_id", "endpoint", "inputs", "seed"}))
                for endpoint, count in Counter(j.result.endpoint for j in jobs if j.stored).items():
                    images_copied(count, endpoint=endpoint)
                if part is not None:
                    part.add([*(j.manifest_entry(self.s3_bucket) for j in jobs), *failed])
                stored += sum(j.stored for j in jobs)
                skipped += sum(j.status is ImageStatus.SKIPPED for j in jobs)
                kept += sum(j.status is ImageStatus.COPIED and j.existed for j in jobs)
                failed_count += len(failed)
                if (chunk_cost := _total_cost(jobs)) is not None:
                    cost = round((cost or 0.0) + chunk_cost, 6)
                if not self._from_summary:
                    uris.extend(f"s3://{self.s3_bucket}/{j.key}" for j in jobs if j.stored)
        except BaseException:
            self._rollback(created, kept)
            raise
        manifest_uri = self._write_manifest(part, cost, context) if part is not None else None
        lineage.images, lineage.cost_usd = stored, cost
        self._record_lineage(lineage, uris if len(uris) == stored else None, stored, manifest_uri, context)
        if self._from_summary:  # a batch's: as small as its summary, whatever the batch's size
            return {
                "kind": "flux_copy",
                "manifest_uri": manifest_uri,
                "bucket": self.s3_bucket,
                "prefix": self.s3_key_prefix.strip("/"),
                "images": stored,
                "skipped": skipped,
                "failed": failed_count,
            }
        return uris

    def _copy_all(self, results: list[FluxResult], created: list[str]) -> list[ImageJob]:
        """Plan, check and copy the images of ``results``; the keys this try creates go to ``created``."""
        jobs = self._plan(results)
        flagged = [j for j in jobs if j.nsfw]
        if flagged and self.nsfw_policy == "fail":
            names = ", ".join(f"{j.request_id}#{j.index}" for j in flagged)
            raise FluxError(f"{len(flagged)} image(s) flagged NSFW by the API and nsfw_policy='fail': {names}")
        for job in flagged:
            if self.nsfw_policy == "skip":
                job.status, job.reason = ImageStatus.SKIPPED, "nsfw"
        todo = [j for j in jobs if j.status is ImageStatus.PENDING]
        self._check_image_hosts(todo)
        check_destinations(self.s3_hook.get_conn(), self.s3_bucket, todo, replace=self.replace)
        todo = [j for j in todo if j.status is ImageStatus.PENDING]
        self.log.info(
            "Copying %d image(s) of %d request(s) to s3://%s/%s (%d skipped as NSFW)",
            len(todo),
            len(results),
            self.s3_bucket,
            self.s3_key_prefix.strip("/"),
            len(jobs) - len(todo) - sum(j.status is ImageStatus.REUSED for j in jobs),
        )
        errors: list[tuple[ImageJob, BaseException]] = []
        # One line per image for a few; for many, a line every PROGRESS_INTERVAL seconds.
        each = logging.INFO if len(todo) <= MANY_IMAGES else logging.DEBUG
        copied, last_progress = 0, time.monotonic()
        with ThreadPoolExecutor(max_workers=min(self.max_workers, max(1, len(todo)))) as pool:
            futures = {pool.submit(self._copy, job): job for job in todo}
            for future in as_completed(futures):
                job = futures[future]
                if (exc := future.exception()) is not None:
                    errors.append((job, exc))
                    continue
                copied += 1
                if not job.existed:
                    created.append(job.key)
                self.log.log(
                    each, "Copied s3://%s/%s (%s bytes, %.2fs)", self.s3_bucket, job.key, job.size, job.seconds
                )
                if each != logging.INFO and time.monotonic() - last_progress >= PROGRESS_INTERVAL:
                    last_progress = time.monotonic()
                    self.log.info("Copied %d of %d image(s)", copied, len(todo))
        if errors:
            job, exc = errors[0]
            raise FluxError(
                f"Copy of {len(errors)} image(s) failed; first: s3://{self.s3_bucket}/{job.key}: {exc}"
            ) from exc
        return jobs

    @property
    def _manifest_key(self) -> str:
        prefix = self.s3_key_prefix.strip("/")
        return f"{prefix}/{self.manifest_name}" if prefix else str(self.manifest_name)

    def _write_manifest(self, part: ManifestPart, cost: float | None, context: Context) -> str:
        part.cost_usd = cost
        written = write_manifest(self.s3_hook.get_conn(), part, self._manifest_key, replace=self.replace)
        uri = f"s3://{self.s3_bucket}/{self._manifest_key}"
        shared = f"; {written.images} of {len(written.writers)} tasks in all" if len(written.writers) > 1 else ""
        self.log.info("Wrote manifest %s (%d images%s)", uri, part.count, shared)
        context["ti"].xcom_push(key=MANIFEST_XCOM_KEY, value=uri)
        return uri

    def _record_lineage(
        self, lineage: FluxLineage, uris: list[str] | None, count: int, manifest_uri: str | None, context: Context
    ) -> None:
        # The manifest and each image, or (too many for one event) the manifest and their prefix.
        named = named_or_prefix(uris, f"s3://{self.s3_bucket}/{self.s3_key_prefix.strip('/')}/")
        for uri in [*([manifest_uri] if manifest_uri else []), *named]:
            lineage.add_output(uri)
        # Downstream DAGs scheduled on this task's outlets get the manifest and the count.
        outlet_events = context.get("outlet_events")
        for outlet in self.outlets or []:
            if outlet_events is not None and hasattr(outlet, "uri"):
                outlet_events[outlet].extra = {"manifest": manifest_uri, "images": count}
