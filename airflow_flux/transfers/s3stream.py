"""Stream a forward-only byte stream into S3: one streamed PUT, or bounded multipart.

A source of known size goes up as ONE ``PutObject`` whose body is read from the source
while it is sent, framed as aws-chunked with its SHA-256 as a *trailer*, which S3
verifies before the object exists. Download and upload overlap completely, memory is a
few 128 KiB pieces whatever the size, and the object appears atomically: a PUT that
breaks leaves nothing. (A header checksum, botocore's choice over http, needs the whole
body read before the first byte is sent; botocore streams with a trailer over https
only, then in 1 MiB chunks it holds and copies, see :class:`_AwsChunkedBody`.)

Sources of unknown size, or larger than one PUT may be, go as a multipart upload. Why
not boto3's ``upload_fileobj`` there: for a non-seekable source s3transfer slices and
concatenates ``bytes``, holding several times the part size per part (``bench/ANALYSIS.md``,
transfer). Here each
part is read straight into one of ``concurrency + 1`` preallocated buffers and uploaded
from a zero-copy view, so memory is ``(concurrency + 1) x part_size`` whatever the size.
"""

from __future__ import annotations

import base64
import hashlib
import io
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_SINGLE_PUT = 5 * 1024**3  # S3's largest PutObject
# Payload per aws-chunked chunk: the largest MinIO accepts (it refuses more). Fewer chunks
# are cheaper for the server (moto joins them in quadratic time): botocore's own 1 MiB
# chunks made a large copy several times slower (bench/ANALYSIS.md, transfer).
AWS_CHUNK_SIZE = 16 * 1024 * 1024


class StreamNotResendableError(Exception):
    """A streamed PUT failed in a way botocore would retry, but its body was already
    (partly) sent and cannot be rewound: only reading the source again can retry it."""


_TRAILER_NAME = b"x-amz-checksum-sha256"
_LAST_CHUNK_LENGTH = len(b"0\r\n%s:%s\r\n\r\n" % (_TRAILER_NAME, b"=" * 44))  # 44: a base64 SHA-256


class _AwsChunkedBody:
    """``size`` bytes of ``read`` framed as aws-chunked, with a trailing SHA-256; forward only.

    The payload is handed out as ``read`` returns it, uncopied: a chunk is announced by its
    size and never held whole, so chunks can be large at no memory cost. Its exact encoded
    length is known up front (``Content-Length``). It rewinds only before its first read,
    so botocore can never resend a partial body; a source failure is kept in :attr:`error`
    (botocore wraps whatever a body raises) and an S3 failure in :attr:`failure`.
    """

    def __init__(
        self, read: Callable[[int], bytes], size: int, *, chunk_size: int, sha256: Callable[[], str] | None
    ) -> None:
        self._read = read
        self.size = size
        self._chunk_size = chunk_size
        self._own_sha256 = hashlib.sha256() if sha256 is None else None
        self._source_sha256 = sha256
        self.sent = 0  # payload bytes handed out
        self._chunk_left = 0
        self._frame = b""  # framing still to hand out
        self._finished = False
        self._position = 0  # encoded bytes handed out
        self.error: BaseException | None = None
        self.failure: str | None = None

    def __len__(self) -> int:
        full, rest = divmod(self.size, self._chunk_size)
        framing = full * (len(b"%x\r\n\r\n" % self._chunk_size)) + (len(b"%x\r\n\r\n" % rest) if rest else 0)
        return self.size + framing + _LAST_CHUNK_LENGTH

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if offset == 0 and whence in (io.SEEK_SET, io.SEEK_CUR) and self._position == 0:
            return 0
        raise io.UnsupportedOperation(f"a streamed body cannot be rewound after {self.sent} bytes")

    def read(self, size: int | None = -1) -> bytes:
        try:
            out = (
                self._next(size) if size is not None and size >= 0 else b"".join(iter(lambda: self._next(1 << 20), b""))
            )
        except BaseException as exc:
            self.error = exc
            raise
        self._position += len(out)
        return out

    def _next(self, size: int) -> bytes:
        """The next piece, at most ``size`` bytes (framing or payload, never both)."""
        if not self._frame:
            if self._chunk_left:
                data = self._read(min(size, self._chunk_left))
                if not data:
                    raise ValueError(f"source ended after {self.sent} of its announced {self.size} bytes")
                self._chunk_left -= len(data)
                self.sent += len(data)
                if self._own_sha256 is not None:
                    self._own_sha256.update(data)
                if not self._chunk_left:
                    self._frame = b"\r\n"
                return data
            if self.sent < self.size:
                self._chunk_left = min(self._chunk_size, self.size - self.sent)
                self._frame = b"%x\r\n" % self._chunk_left
            elif not self._finished:
                # One more read lets the source check its own length; a source longer
                # than announced must fail rather than be cut short.
                if self._read(1):
                    raise ValueError(f"source is longer than its announced {self.size} bytes")
                self._finished = True
                self._frame = b"0\r\n%s:%s\r\n\r\n" % (_TRAILER_NAME, self._b64_sha256())
        out, self._frame = self._frame[:size], self._frame[size:]
        return out

    def _b64_sha256(self) -> bytes:
        if self._own_sha256 is not None:
            return base64.b64encode(self._own_sha256.digest())
        assert self._source_sha256 is not None
        return base64.b64encode(bytes.fromhex(self._source_sha256()))


_register_lock = threading.Lock()


def _send_aws_chunked(params: dict[str, Any], **kwargs: Any) -> None:
    """``before-call.s3.PutObject``: send an :class:`_AwsChunkedBody` as it is.

    A ``trailer`` algorithm makes the signer send ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``
    instead of hashing the body first (which over http it would); naming it after a header
    that is already set tells botocore the body is encoded already.
    """
    body = params.get("body")
    if not isinstance(body, _AwsChunkedBody):
        return
    params["headers"].update(
        {
            "Content-Length": str(len(body)),
            "Content-Encoding": "aws-chunked",
            "X-Amz-Decoded-Content-Length": str(body.size),
            "X-Amz-Trailer": _TRAILER_NAME.decode(),
        }
    )
    checksum = params["context"].setdefault("checksum", {})
    checksum["request_algorithm"] = {"algorithm": "sha256", "in": "trailer", "name": "X-Amz-Trailer"}


def _retry_only_if_resendable(
    request_dict: dict[str, Any], response: Any = None, caught_exception: Any = None, **kwargs: Any
) -> bool | None:
    """``needs-retry.s3.PutObject`` (runs before botocore's own): never retry a broken
    source, resending cannot mend it; note any other failure for the error message."""
    body = request_dict.get("body")
    if not isinstance(body, _AwsChunkedBody):
        return None
    if body.error is not None:
        return False
    if caught_exception is not None:
        body.failure = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None and response[0].status_code >= 300:
        body.failure = f"HTTP {response[0].status_code} {response[1].get('Error', {}).get('Code', '')}".strip()
    return None


def _register_handlers(client: Any) -> None:
    with _register_lock:  # unique_id makes it idempotent, but registration is not thread-safe
        events = client.meta.events
        events.register("before-call.s3.PutObject", _send_aws_chunked, unique_id="airflow-flux-aws-chunked")
        events.register_first(
            "needs-retry.s3.PutObject", _retry_only_if_resendable, unique_id="airflow-flux-aws-chunked-retry"
        )


def put_stream(
    client: Any,
    read: Callable[[int], bytes],
    *,
    bucket: str,
    key: str,
    size: int,
    extra_args: dict[str, Any],
    chunk_size: int = AWS_CHUNK_SIZE,
    sha256: Callable[[], str] | None = None,
) -> dict[str, Any]:
    """Upload exactly ``size`` bytes of ``read`` as one ``PutObject`` with a trailing SHA-256.

    :param read: ``read(n)`` of the source; must raise on a broken or short stream.
    :param size: the source's exact size (at most :data:`MAX_SINGLE_PUT`).
    :param extra_args: ``ContentType``, ``Metadata``... passed to the put call.
    :param chunk_size: payload bytes per aws-chunked chunk (only announced, never buffered).
    :param sha256: returns the hex SHA-256 of all ``read`` returned, if the source hashes
        itself (saves hashing twice); S3 then verifies that very digest.
    :return: the ``PutObject`` response.
    :raises StreamNotResendableError: S3 or the connection failed in a way worth retrying,
        after the body had started; retry by reading the source again.
    """
    from botocore.exceptions import UnseekableStreamError

    _register_handlers(client)
    body = _AwsChunkedBody(read, size, chunk_size=chunk_size, sha256=sha256)
    try:
        return dict(client.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256", **extra_args))
    except UnseekableStreamError as exc:
        if body.error is not None:
            raise body.error from None
        raise StreamNotResendableError(
            f"PUT s3://{bucket}/{key} failed ({body.failure or 'no detail'}) after {body.sent} of {size} bytes "
            "were read from the source, which cannot be read again"
        ) from exc
    except Exception:
        if body.error is not None:  # the source broke: that, not botocore's wrapper, is the cause
            raise body.error from None
        raise


class _ViewBody(io.RawIOBase):
    """A seekable, read-only file over a memoryview: botocore reads, hashes and rewinds it
    (checksums, retries) without the part ever being copied whole."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._view)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._view) - self._pos)
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = self._view[self._pos : end].tobytes()
        self._pos = end
        return data


def _fill(read: Callable[[int], bytes], buffer: bytearray, chunk: int = 1024 * 1024) -> int:
    """Read into ``buffer`` until it is full or the stream ends; returns the bytes read."""
    filled = 0
    size = len(buffer)
    while filled < size:
        data = read(min(chunk, size - filled))
        if not data:
            break
        buffer[filled : filled + len(data)] = data
        filled += len(data)
    return filled


def whole_object_sha256(head: Mapping[str, Any]) -> str | None:
    """The object's SHA-256 (hex) from S3's own checksum in a ``head_object`` (``ChecksumMode=ENABLED``)
    answer, or None when it has none or only a multipart one (a checksum of part checksums,
    ``"...-N"``, is not the object's).

    :param head: the ``head_object`` response.
    """
    checksum = head.get("ChecksumSHA256") or ""
    if not checksum or "-" in checksum or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    return base64.b64decode(checksum).hex()


def _b64_sha256(view: memoryview) -> str:
    return base64.b64encode(hashlib.sha256(view).digest()).decode()


UploadMode = Literal["put", "streamed", "multipart"]


def stream_to_s3(
    client: Any,
    read: Callable[[int], bytes],
    *,
    bucket: str,
    key: str,
    size_hint: int | None,
    extra_args: dict[str, Any],
    part_size: int,
    concurrency: int,
    digest_metadata_key: str | None = None,
    max_single_put: int = MAX_SINGLE_PUT,
    sha256: Callable[[], str] | None = None,
) -> UploadMode:
    """Upload what ``read`` yields to ``s3://bucket/key``; all or nothing.

    A source known to fit in one part is buffered and sent with one ``PutObject`` carrying
    its SHA-256 (S3 rejects the body if it does not match), which also goes to the metadata.
    A larger one of known size is streamed as one ``PutObject`` with a trailing SHA-256
    (:func:`put_stream`). Anything else goes as a multipart upload with a SHA-256 per part;
    on any failure the upload is aborted, so no object (and no orphaned parts) are left behind.

    :param read: ``read(n)`` of the source; must raise on a broken or short stream.
    :param size_hint: the source's expected size, if known.
    :param extra_args: ``ContentType``, ``Metadata``... passed to the create/put call.
    :param digest_metadata_key: user-metadata key that receives the hex SHA-256 of the
        object when it is known before the upload (buffered path).
    :param max_single_put: largest source streamed as one PUT (capped at S3's 5 GiB).
    :param sha256: see :func:`put_stream`.
    :return: how it went up: ``put`` (buffered, digest in the metadata), ``streamed`` or
        ``multipart``.
    :raises StreamNotResendableError: see :func:`put_stream`.
    """
    part_size = max(part_size, MIN_PART_SIZE)
    if size_hint is not None and size_hint <= part_size:
        buffer = bytearray(max(size_hint, 1))
        n = _fill(read, buffer)
        if read(1):  # longer than announced: the stream would fail its own length check
            raise ValueError(f"source is longer than its announced {size_hint} bytes")
        view = memoryview(buffer)[:n]
        args = dict(extra_args)
        if digest_metadata_key:
            args["Metadata"] = {**args.get("Metadata", {}), digest_metadata_key: hashlib.sha256(view).hexdigest()}
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=_ViewBody(view),
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64_sha256(view),
            **args,
        )
        return "put"
    if size_hint is not None and size_hint <= min(max_single_put, MAX_SINGLE_PUT):
        put_stream(client, read, bucket=bucket, key=key, size=size_hint, extra_args=extra_args, sha256=sha256)
        return "streamed"

    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256", **extra_args)[
        "UploadId"
    ]
    free: queue.Queue[bytearray] = queue.Queue()
    allocated = 0
    parts: list[dict[str, Any]] = []
    futures: list[Future[dict[str, Any]]] = []

    def upload(number: int, buffer: bytearray, n: int) -> dict[str, Any]:
        try:
            view = memoryview(buffer)[:n]
            checksum = _b64_sha256(view)
            resp = client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_ViewBody(view),
                ChecksumSHA256=checksum,
            )
            return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum}
        finally:
            free.put(buffer)

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            number = 0
            while True:
                if allocated < concurrency + 1 and free.empty():
                    buffer = bytearray(part_size)
                    allocated += 1
                else:
                    buffer = free.get()
                # Fail fast: a part that already failed makes the rest pointless.
                for done in [f for f in futures if f.done()]:
                    done.result()
                n = _fill(read, buffer)
                if n == 0:
                    free.put(buffer)
                    break
                number += 1
                futures.append(pool.submit(upload, number, buffer, n))
                if n < part_size:
                    break
            parts = [f.result() for f in futures]
        if not parts:  # an empty source: S3 wants at least one part
            parts = [upload(1, bytearray(0), 0)]
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    return "multipart"
