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
from typing import Any
from urllib.parse import quote, unquote

from pydantic import BaseModel, ConfigDict

from airflow_flux.exceptions import FluxError, FluxImageExistsError

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


def summarize(
    results: Sequence[Mapping[str, Any]], results_uri: str, endpoint: str | None, flux_conn_id: str | None
) -> BatchResultsSummary:
    """The summary of a batch's result items (as the operator returns them) written at ``results_uri``."""
    completed = [r for r in results if r.get("status") == "completed"]
    costs = [r["cost_usd"] for r in completed if r.get("cost_usd") is not None]
    return BatchResultsSummary(
        results_uri=results_uri,
        requests=len(results),
        completed=len(completed),
        failed=len(results) - len(completed),
        images=sum(len(r.get("images") or []) for r in completed),
        cost_usd=round(sum(costs), 6) if costs else None,
        endpoint=endpoint,
        flux_conn_id=flux_conn_id,
    )


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
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def write_results(
    client: Any, bucket: str, key: str, lines: Iterable[Mapping[str, Any]], *, owner: Mapping[str, Any]
) -> int:
    """Write ``lines`` as JSON Lines to ``s3://bucket/key``; the number of lines written.

    :param client: a boto3 S3 client.
    :param owner: the writing task instance (``dag_id``, ``run_id``, ``task_id``, ``map_index``).
    :raises FluxImageExistsError: the key holds another task instance's results, or an
        object that is not a results file.
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
    count = 0
    # On disk, not in memory: a batch of 100,000 results is some tens of megabytes.
    with tempfile.TemporaryFile() as spool:
        for line in lines:
            spool.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
            count += 1
        spool.seek(0)
        client.upload_fileobj(
            spool,
            bucket,
            key,
            ExtraArgs={
                "ContentType": "application/x-ndjson",
                "Metadata": {**owner_metadata(owner), "flux-lines": str(count)},
                "ChecksumAlgorithm": "SHA256",
            },
        )
    return count


def read_results(client: Any, uri: str, *, dag_id: str, run_id: str) -> Iterator[dict[str, Any]]:
    """The lines of a results file, one at a time, if a task of ``dag_id``'s ``run_id`` wrote it.

    :param client: a boto3 S3 client.
    :param uri: ``s3://bucket/key``, as a summary names it.
    :raises FluxError: the object is missing, or was not written by a task of this DAG run.
    """
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise FluxError(f"results_uri: not an s3:// URI: {uri!r}")
    bucket, key = uri[5:].split("/", 1)
    from botocore.exceptions import ClientError

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
