"""A batch's results as JSON Lines in S3, and the small summary that names them in XCom.

A leaf module: :class:`~airflow_flux.operators.FluxBatchGenerateOperator` writes the file
when it is given ``results_s3_bucket``, :class:`~airflow_flux.transfers.FluxToS3Operator`
and other jobs read it. One line per request, in input order: ``index``, ``prompt``,
``request_id``, ``status`` (``completed`` or ``failed``), and the result's ``images``,
``seed``, ``cost_usd``... or the API's ``error``, ``error_type`` and ``status_code``: the
items the operator returns as a list otherwise. The XCom is then a
:class:`BatchResultsSummary` (counts, cost, the file's URI) whatever the batch's size.

Written through a temporary file and one upload (S3 shows an object only once the upload is
complete, so no reader sees half a file), with the writing task instance in the object's
metadata. A reader is handed the URI by an XCom, which someone else may have written: it reads
the file only when that metadata names a task of its own DAG run (:func:`read_results`), and a
writer refuses a key that holds another task instance's results.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from pydantic import BaseModel, ConfigDict

from airflow_flux.exceptions import FluxError, FluxImageExistsError, s3_not_found
from airflow_flux.manifest import split_s3_uri

if TYPE_CHECKING:
    from airflow_flux.lineage import FluxLineage

#: The summary's marker: a mapping with this ``kind`` names a results file.
RESULTS_KIND = "flux_batch_results"
#: Object metadata naming the writing task instance (URL-quoted: metadata is ASCII).
_OWNER_KEYS = ("dag_id", "run_id", "task_id", "map_index")


class BatchResultsSummary(BaseModel):
    """What a batch with a results file returns: small, whatever the batch's size.

    :param results_uri: the JSON Lines file, ``s3://bucket/key``.
    """

    model_config = ConfigDict(extra="ignore")

    kind: str = RESULTS_KIND
    results_uri: str
    requests: int
    completed: int
    failed: int
    images: int
    cost_usd: float | None = None
    endpoint: str | None = None
    flux_conn_id: str | None = None

    @staticmethod
    def is_summary(value: Any) -> bool:
        """Whether ``value`` (an XCom, say) is such a summary."""
        return isinstance(value, Mapping) and value.get("kind") == RESULTS_KIND and "results_uri" in value


def default_results_key(owner: Mapping[str, Any]) -> str:
    """``flux/{dag_id}/{run_id}/_results/{task_id}[.{map_index}].jsonl``: one per task instance."""
    mapped = "" if int(owner["map_index"]) < 0 else f".{owner['map_index']}"
    return f"flux/{owner['dag_id']}/{owner['run_id']}/_results/{owner['task_id']}{mapped}.jsonl"


class Tally:
    """Counts, images and cost of result lines, added one at a time (a file need not fit in memory)."""

    def __init__(self, lineage: FluxLineage | None = None) -> None:
        self.requests = self.completed = self.images = 0
        self.cost: float | None = None
        #: Where the lines' inputs and request ids go too (bounded), for the task's lineage.
        self.lineage = lineage

    def add(self, line: Mapping[str, Any]) -> None:
        """Count one line (a result item as the operator returns it)."""
        self.requests += 1
        if self.lineage is not None:
            self.lineage.add_request(line)
        if line.get("status") == "completed":
            self.completed += 1
            self.images += len(line.get("images") or [])
            if line.get("cost_usd") is not None:
                self.cost = (self.cost or 0.0) + float(line["cost_usd"])

    @property
    def failed(self) -> int:
        return self.requests - self.completed

    def summary(self, results_uri: str, endpoint: str | None, flux_conn_id: str | None) -> BatchResultsSummary:
        """The summary of the lines counted, written at ``results_uri``."""
        return BatchResultsSummary(
            results_uri=results_uri,
            requests=self.requests,
            completed=self.completed,
            failed=self.failed,
            images=self.images,
            cost_usd=round(self.cost, 6) if self.cost is not None else None,
            endpoint=endpoint,
            flux_conn_id=flux_conn_id,
        )


def summarize(
    results: Iterable[Mapping[str, Any]], results_uri: str, endpoint: str | None, flux_conn_id: str | None
) -> BatchResultsSummary:
    """The summary of a batch's result items (as the operator returns them) written at ``results_uri``."""
    tally = Tally()
    for line in results:
        tally.add(line)
    return tally.summary(results_uri, endpoint, flux_conn_id)


def owner_metadata(owner: Mapping[str, Any]) -> dict[str, str]:
    """S3 metadata naming the writing task instance."""
    return {f"flux-{k.replace('_', '-')}": quote(str(owner[k]), safe="") for k in _OWNER_KEYS}


def _owner_of(metadata: Mapping[str, str]) -> dict[str, str] | None:
    try:
        return {k: unquote(metadata[f"flux-{k.replace('_', '-')}"]) for k in _OWNER_KEYS}
    except KeyError:
        return None


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if s3_not_found(exc):
            return None
        raise


def check_writable(client: Any, bucket: str, key: str, *, owner: Mapping[str, Any]) -> None:
    """Refuse ``s3://bucket/key`` when it holds another task instance's results, or another object.

    :raises FluxImageExistsError: it does.
    """
    head = _head(client, bucket, key)
    if head is not None:
        found = _owner_of(head.get("Metadata") or {})
        mine = {k: str(owner[k]) for k in _OWNER_KEYS}
        if found != mine:
            whose = f"the results of {found}" if found else "an object that is not a FLUX results file"
            raise FluxImageExistsError(
                f"Refusing to overwrite s3://{bucket}/{key}: it holds {whose} (give this task its own key)"
            )


def write_results(
    client: Any, bucket: str, key: str, lines: Iterable[Mapping[str, Any]], *, owner: Mapping[str, Any]
) -> int:
    """Write ``lines`` as JSON Lines to ``s3://bucket/key``; the number of lines written.

    :param client: a boto3 S3 client.
    :param owner: the writing task instance (``dag_id``, ``run_id``, ``task_id``, ``map_index``).
    :raises FluxImageExistsError: the key holds another task instance's results, or an
        object that is not a results file.
    """
    check_writable(client, bucket, key, owner=owner)
    count = 0
    # On disk, not in memory: a batch of 100,000 results is some tens of megabytes.
    with tempfile.TemporaryFile() as spool:
        for line in lines:
            spool.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            count += 1
        spool.seek(0)
        from boto3.s3.transfer import TransferConfig

        client.upload_fileobj(
            spool,
            bucket,
            key,
            ExtraArgs={
                "ContentType": "application/x-ndjson",
                "Metadata": {**owner_metadata(owner), "flux-lines": str(count)},
                "ChecksumAlgorithm": "SHA256",
            },
            # One part in memory at a time: boto3's default (10 threads of 8 MiB parts) held
            # 64 MB more for the 51 MB file of 100,000 results (bench/ANALYSIS.md).
            Config=TransferConfig(use_threads=False),
        )
    return count


def read_results(client: Any, uri: str, *, dag_id: str, run_id: str) -> Iterator[dict[str, Any]]:
    """The lines of a results file, one at a time, if a task of ``dag_id``'s ``run_id`` wrote it.

    :param client: a boto3 S3 client.
    :param uri: ``s3://bucket/key``, as a summary names it.
    :raises FluxError: the object is missing, or was not written by a task of this DAG run.
    """
    from botocore.exceptions import ClientError

    try:
        bucket, key = split_s3_uri(uri)
    except ValueError as exc:
        raise FluxError(f"results_uri: {exc}") from None

    try:
        obj = client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        raise FluxError(f"The batch results {uri} cannot be read: {exc}") from exc
    owner = _owner_of(obj.get("Metadata") or {})
    if owner is None or (owner["dag_id"], owner["run_id"]) != (dag_id, run_id):
        obj["Body"].close()
        raise FluxError(
            f"Refusing the batch results {uri}: they were not written by a task of this DAG run "
            f"({dag_id}, {run_id}); written by {owner or 'no FLUX task'}"
        )
    body = obj["Body"]
    try:
        for raw in body.iter_lines():
            if raw.strip():
                yield json.loads(raw)
    finally:
        body.close()


# -- a windowed batch's checkpoints -------------------------------------------------------------
#
# A batch run as a window writes its finished requests' lines as it goes, a few hundred per
# object under ``{key}.parts/``, so a later try knows what was paid for and finished without
# holding any of it in the task state; the results file is composed from them at the end.


def parts_prefix(key: str) -> str:
    """Where the checkpoints of the results file at ``key`` go."""
    return f"{key}.parts/"


def list_parts(client: Any, bucket: str, key: str, *, owner: Mapping[str, Any]) -> list[tuple[int, str]]:
    """The checkpoints of ``key`` as ``(sequence, object key)``, in order; all this task instance's.

    :raises FluxImageExistsError: one was written by another task instance (two tasks were
        given the same results key): nothing of it is read.
    """
    prefix = parts_prefix(key)
    found: list[tuple[int, str]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) :]
            if name.endswith(".jsonl") and name[: -len(".jsonl")].isdigit():
                found.append((int(name[: -len(".jsonl")]), item["Key"]))
    found.sort()
    if found:  # the owner of every part is checked as it is read; the first one here, before any call
        _check_owner(client.head_object(Bucket=bucket, Key=found[0][1]), bucket, found[0][1], owner)
    return found


def write_part(
    client: Any, bucket: str, key: str, sequence: int, lines: Sequence[Mapping[str, Any]], *, owner: Mapping[str, Any]
) -> str:
    """Write checkpoint ``sequence`` of the results file at ``key``; its object key."""
    part = f"{parts_prefix(key)}{sequence:06d}.jsonl"
    body = b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
    client.put_object(
        Bucket=bucket,
        Key=part,
        Body=body,
        ContentType="application/x-ndjson",
        Metadata={**owner_metadata(owner), "flux-lines": str(len(lines))},
        ChecksumAlgorithm="SHA256",
    )
    return part


def read_part(client: Any, bucket: str, part: str, *, owner: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The lines of one checkpoint, if this task instance wrote it (else FluxImageExistsError)."""
    obj = client.get_object(Bucket=bucket, Key=part)
    body = obj["Body"]
    try:
        _check_owner(obj, bucket, part, owner)
        for raw in body.iter_lines():
            if raw.strip():
                yield json.loads(raw)
    finally:
        body.close()


def _check_owner(obj: Mapping[str, Any], bucket: str, key: str, owner: Mapping[str, Any]) -> None:
    found = _owner_of(obj.get("Metadata") or {})
    if found != {k: str(owner[k]) for k in _OWNER_KEYS}:
        whose = f"another task instance's ({found})" if found else "an object that is not a FLUX checkpoint"
        raise FluxImageExistsError(
            f"Refusing the batch checkpoint s3://{bucket}/{key}: it is {whose} (give this task its own results key)"
        )
