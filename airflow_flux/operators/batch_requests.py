"""Where a batch's requests come from: a list, or a JSON Lines file in S3 read a line at a time.

A batch of 100,000 prompts given as a list lives in the run's conf (or an upstream's XCom),
in the DB, and in the worker's memory several times over (the conf, the rendered field, the
list). Given as ``requests="s3://bucket/key.jsonl"`` it is downloaded to an anonymous
temporary file and indexed by line offset (8 bytes a request); an item is parsed only when it
is validated or sent, so the worker's memory does not grow with the batch.

Each non-blank line is one request: a JSON string (a prompt) or a JSON object of request
fields, exactly like an item of a ``requests`` list. The file is read with the task's
``aws_conn_id``; nothing of it is logged but its URI and line count.
"""

from __future__ import annotations

import json
import os
import tempfile
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, overload

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.families import one_image_per_request


def open_requests(requests: Any, *, aws_conn_id: str | None, log: Any) -> Sequence[Any]:
    """A batch's ``requests`` as a sequence: the list given, or a :class:`RequestsFile`.

    :param requests: a list (or an XCom's lazy sequence) of items, or an ``s3://`` URI.
    :param aws_conn_id: the amazon provider's connection the file is read with.
    :param log: the task's logger.
    :raises FluxValidationError: neither, or no request in it.
    """
    if isinstance(requests, str) and requests.strip().startswith("s3://"):
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        lines = RequestsFile.download(S3Hook(aws_conn_id=aws_conn_id).get_conn(), requests)
        if not lines:
            lines.close()
            raise FluxValidationError(f"requests: {requests} has no request (every line is blank)")
        log.info("FLUX batch: %d request(s) from %s", len(lines), requests)
        return lines
    try:
        if isinstance(requests, str | Mapping):
            raise TypeError
        # A slice, not iteration: a mapped upstream's lazy XCom sequence then fetches every
        # item in one request (iterating probes one past the end).
        items = list(requests[:]) if hasattr(requests, "__getitem__") else list(requests)
    except TypeError:
        raise FluxValidationError(
            "requests: must be a list of prompts or of dicts of request fields, or the s3:// URI of a JSON "
            f"Lines file of them (got {type(requests).__name__})"
        ) from None
    if not items:
        raise FluxValidationError("requests: the batch is empty")
    return items


class _Requests(Sequence[Any]):
    """A sequence of requests read by index, one at a time (slices give lists)."""

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._get(index)

    def _get(self, index: int) -> Any:
        raise NotImplementedError


class FannedOut(_Requests):
    """A batch for a model that makes one image a request (FLUX.2 [pro], [max], [flex]): an
    item asking ``num_images=N`` is N requests, in order, each without ``num_images``.

    Where a seed is set, copy ``k`` of an item gets ``seed + k``: N different images, as one
    request's ``num_images`` would give (the same seed would give the same image N times).

    :param items: the batch's items (a list, or a :class:`RequestsFile`).
    :param num_images: the batch's shared ``num_images`` (an item's own wins).
    :param seed: the batch's shared ``seed`` (an item's own wins).
    :param check: called with the number of requests so far, to refuse a batch past its
        ``max_images`` before it is all counted.
    """

    def __init__(self, items: Sequence[Any], *, num_images: Any, seed: Any, check: Any) -> None:
        self.items, self._seed = items, seed
        self._item, self._copy = array("q"), array("q")
        for index in range(len(items)):
            item = items[index]
            asked = item.get("num_images") if isinstance(item, Mapping) else None
            copies = _count(num_images if asked is None else asked, where(items, index))
            check(len(self._item) + copies)
            self._item.extend([index] * copies)
            self._copy.extend(range(copies))

    def __len__(self) -> int:
        return len(self._item)

    def _get(self, index: int) -> Any:
        item, copy = self.items[self._item[index]], self._copy[index]
        fields = {"prompt": item} if isinstance(item, str) else dict(item)
        fields["num_images"] = None  # None: not sent (it wins over the shared value)
        seed = fields.get("seed", self._seed)
        if copy and isinstance(seed, int) and not isinstance(seed, bool):
            fields["seed"] = seed + copy
        return fields

    def where(self, index: int) -> str:
        """The item a request was made from, and which of its images it is."""
        return f"{where(self.items, self._item[index])} (image {self._copy[index] + 1})"

    def close(self) -> None:
        if isinstance(self.items, RequestsFile):
            self.items.close()


def fan_out(items: Sequence[Any], endpoint: str, *, num_images: Any, seed: Any, check: Any, log: Any) -> Sequence[Any]:
    """The batch's requests: ``items`` as they are, or, for a model that makes one image a
    request and an item asking more, a :class:`FannedOut` view (one request per image)."""
    if not one_image_per_request(endpoint):
        return items
    fanned = FannedOut(items, num_images=num_images, seed=seed, check=check)
    if len(fanned) == len(items):
        return items  # one image each: the items as they are
    log.info("FLUX batch: %d item(s) make %d request(s), one image each", len(items), len(fanned))
    return fanned


def _count(value: Any, where: str) -> int:
    if value is None:
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise FluxValidationError(f"{where}: num_images: must be a whole number, 1 or more (got {value!r})")
    return count


def where(items: Sequence[Any], index: int) -> str:
    """How a message names item ``index`` of a batch (a file's names its line too)."""
    return items.where(index) if isinstance(items, RequestsFile | FannedOut) else f"requests[{index}]"


@contextmanager
def closing(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """The items, and a requests file closed (its temporary file freed) when done with them."""
    try:
        yield items
    finally:
        if isinstance(items, RequestsFile | FannedOut):
            items.close()


class RequestsFile(_Requests):
    """The requests of a JSON Lines file, by index (a prompt string or a dict of fields).

    Thread-safe reads (``os.pread``): the window parses an item in its loop's thread while
    submit threads run. Close it (or use it as a context manager) to free the file.

    :param fileobj: the file's bytes, in a binary file opened for reading.
    :param uri: where it came from, for error messages.
    """

    def __init__(self, fileobj: Any, *, uri: str) -> None:
        self.uri = uri
        self._file = fileobj
        self._fd = fileobj.fileno()
        #: Start and end offsets of each non-blank line, in order.
        self._starts, self._ends = array("q"), array("q")
        #: The 1-based line number of each request, for error messages naming the file's line.
        self._lines = array("q")
        fileobj.seek(0)
        offset = 0
        for number, raw in enumerate(fileobj, start=1):
            if raw.strip():
                self._starts.append(offset)
                self._ends.append(offset + len(raw))
                self._lines.append(number)
            offset += len(raw)

    @classmethod
    def download(cls, client: Any, uri: str) -> RequestsFile:
        """Download ``s3://bucket/key`` (streamed, never whole in memory) and index it.

        :param client: a boto3 S3 client (the task's ``aws_conn_id``).
        :raises FluxValidationError: not an ``s3://bucket/key`` URI, or it cannot be read.
        """
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        from airflow_flux.manifest import split_s3_uri

        uri = uri.strip()
        try:
            bucket, key = split_s3_uri(uri)
        except ValueError as exc:
            raise FluxValidationError(f"requests: {exc}") from None
        # Anonymous (unlinked at once): nothing is left behind, whatever kills the task.
        fileobj = tempfile.TemporaryFile(prefix="flux-requests-")  # noqa: SIM115 (the RequestsFile owns it)
        try:
            # One part in memory at a time (boto3's default is 10 threads of 8 MiB parts).
            client.download_fileobj(bucket, key, fileobj, Config=TransferConfig(use_threads=False))
        except (ClientError, BotoCoreError) as exc:
            fileobj.close()
            raise FluxValidationError(f"requests: the JSON Lines file {uri} cannot be read: {exc}") from None
        except BaseException:
            fileobj.close()
            raise
        return cls(fileobj, uri=uri)

    def __len__(self) -> int:
        return len(self._starts)

    def _get(self, index: int) -> Any:
        start = self._starts[index]
        raw = os.pread(self._fd, self._ends[index] - start, start)
        where = self.where(index)
        try:
            item = json.loads(raw)
        except ValueError:
            # The line itself is not quoted: it may be anything, a secret included.
            raise FluxValidationError(f"{where}: not JSON; each line is a JSON string or object") from None
        if not isinstance(item, str | dict):
            raise FluxValidationError(
                f"{where}: a JSON {type(item).__name__}; each line is a prompt string or an object of request fields"
            )
        return item

    def where(self, index: int) -> str:
        """``requests[index]`` and its line in the file, for a message refusing it."""
        return f"requests[{index}] (line {self._lines[index]} of {self.uri})"

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RequestsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
