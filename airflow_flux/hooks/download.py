"""Downloading generated images: URLs on allowed hosts (never sent the token) or inline ``data:`` URIs.

Which hosts are allowed, and which addresses, is :mod:`~airflow_flux.hooks.egress`'s to say;
:func:`open_image` checks the URL and every redirect against it before following.
:class:`ImageStream` is what the copy to S3 reads: forward only, counted, capped, hashed and
checked against ``Content-Length``, so a half-read image can never pass for a whole one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from airflow_flux.exceptions import FluxImageTooLargeError, FluxIntegrityError, FluxTransportError
from airflow_flux.hooks.responses import MAX_DETAIL_CHARS, api_error, parse_json, transport_error
from airflow_flux.redact import redact_presigned

if TYPE_CHECKING:
    from collections.abc import Iterator

    import requests

    from airflow_flux.hooks.egress import ImageHostPolicy
    from airflow_flux.hooks.retry import RetryPolicy


#: Redirects one image download may follow (each to an allowed host only).
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


@contextmanager
def open_image(
    session: requests.Session,
    url: str,
    *,
    policy: ImageHostPolicy,
    retry_policy: RetryPolicy,
    timeout: float = 60.0,
) -> Iterator[ImageStream]:
    """Open a generated image for streaming: a URL on a host ``policy`` allows (no token sent) or a ``data:`` URI.

    The host of the URL and of every redirect is checked before it is contacted; ``session``
    (:func:`~airflow_flux.hooks.egress.image_session`) checks each address it connects to.
    Opening follows the retry policy; the stream verifies the byte count against
    ``Content-Length``, stops past ``policy.max_bytes`` and hashes what it reads (SHA-256).

    :raises FluxImageHostRefusedError: a host not allowed (nothing was sent to it).
    :raises FluxImageTooLargeError: an image over ``policy.max_bytes``.
    """
    if url.startswith("data:"):
        stream = ImageStream.from_data_uri(url)
        _check_size(stream.content_length, policy, url)
        yield stream
        return
    if urlsplit(url).scheme not in ("http", "https"):
        raise FluxIntegrityError(f"Image URL has an unsupported scheme: {url[:100]!r}")
    policy.check_url(url)
    import requests

    what = "Image download"

    def attempt() -> requests.Response:
        target = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = session.get(target, stream=True, timeout=(min(timeout, 30.0), timeout), allow_redirects=False)
            except requests.RequestException as exc:
                raise transport_error(what, exc, None, True) from exc
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECTS or not location:
                break
            resp.close()
            # Checked before it is followed: an allowed host must not be a way to reach another.
            target = urljoin(target, location)
            policy.check_url(target)
        else:
            raise FluxIntegrityError(f"Image download: more than {MAX_REDIRECTS} redirects from {url[:200]}")
        if resp.status_code >= 300:
            raw = resp.raw.read(MAX_DETAIL_CHARS, decode_content=True) or b""
            resp.close()
            raise api_error(resp.status_code, resp.headers, parse_json(raw), raw, what=what, request_id=None)
        return resp

    resp = retry_policy.call(attempt)
    try:
        length = resp.headers.get("Content-Length")
        content_length = int(length) if length and length.isdigit() else None
        _check_size(content_length, policy, url)
        yield ImageStream(
            resp.raw,
            url=url,
            content_length=content_length,
            content_type=resp.headers.get("Content-Type"),
            max_bytes=policy.max_bytes,
            conn_id=policy.conn_id,
        )
    finally:
        resp.close()


def _check_size(size: int | None, policy: ImageHostPolicy, url: str) -> None:
    if size is not None and size > policy.max_bytes:
        raise FluxImageTooLargeError(_too_large(f"is {size} bytes", policy.max_bytes, policy.conn_id, url))


def _too_large(what: str, max_bytes: int, conn_id: str | None, url: str) -> str:
    return (
        f"Image {'(data: URI)' if url.startswith('data:') else redact_presigned(url[:300])} {what}, over the "
        f"{max_bytes / 1048576:g} MiB cap of connection {conn_id!r}; nothing of it was stored. "
        "Raise the connection's extra 'max_image_mib' to copy it."
    )


class ImageStream:
    """A forward-only image byte stream that counts, hashes and checks its length.

    ``read(n)`` returns exactly ``n`` bytes until the end (what s3transfer expects of a
    non-seekable upload source); transport failures become :class:`FluxTransportError`
    and a short body a :class:`FluxIntegrityError`, so a half-read image can never be
    mistaken for a whole one. It has no ``seek``, so uploads stream it in parts.
    """

    def __init__(
        self,
        raw: Any,
        *,
        url: str,
        content_length: int | None,
        content_type: str | None,
        max_bytes: int | None = None,
        conn_id: str | None = None,
    ) -> None:
        self._raw = raw
        self.url = url
        self.max_bytes = max_bytes
        self._conn_id = conn_id
        self._raw_read = 0
        self.content_length = content_length
        self.content_type = (content_type or "").split(";")[0].strip().lower() or None
        self.bytes_read = 0
        self._sha256 = hashlib.sha256()
        self._head = b""
        self._eof = False

    @classmethod
    def from_data_uri(cls, uri: str) -> ImageStream:
        import io

        header, _, payload = uri.partition(",")
        if not header.startswith("data:") or ";base64" not in header:
            raise FluxIntegrityError("Only base64 data: URIs are supported for inline images")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FluxIntegrityError(f"Inline image is not valid base64: {exc}") from None
        return cls(io.BytesIO(data), url="data:", content_length=len(data), content_type=header[5:].split(";")[0])

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def peek(self, n: int = 16) -> bytes:
        """The first ``n`` bytes (read ahead, still returned by ``read``): for magic checks."""
        if len(self._head) < n and self.bytes_read == 0:
            self._head += self._read_raw(n - len(self._head))
        return self._head[:n]

    def readable(self) -> bool:
        return True

    def _read_raw(self, n: int) -> bytes:
        import urllib3.exceptions
        from requests.exceptions import RequestException

        if self.max_bytes is not None:
            # One byte past the cap is enough to know: an answer without Content-Length
            # would otherwise stream without bound.
            n = min(n, self.max_bytes + 1 - self._raw_read)
        try:
            data = self._raw.read(n) or b""
        except (OSError, urllib3.exceptions.HTTPError, RequestException) as exc:
            raise FluxTransportError(
                f"Image download broke after {self.bytes_read + len(self._head)} bytes: {type(exc).__name__}: {exc}"
            ) from exc
        self._raw_read += len(data)
        if self.max_bytes is not None and self._raw_read > self.max_bytes:
            raise FluxImageTooLargeError(
                _too_large(f"is larger than {self.max_bytes} bytes", self.max_bytes, self._conn_id, self.url)
            )
        return data

    def read(self, n: int = -1) -> bytes:
        if self._eof:
            return b""
        chunks: list[bytes] = []
        want = n if n >= 0 else 1 << 62
        if self._head:
            chunks.append(self._head[:want])
            self._head = self._head[want:]
            want -= len(chunks[0])
        while want > 0:
            data = self._read_raw(min(want, 1 << 20))
            if not data:
                self._eof = True
                break
            chunks.append(data)
            want -= len(data)
        out = b"".join(chunks)
        self.bytes_read += len(out)
        self._sha256.update(out)
        if self._eof and self.content_length is not None and self.bytes_read != self.content_length:
            raise FluxIntegrityError(
                f"Image download ended after {self.bytes_read} of {self.content_length} bytes: {self.url[:200]}"
            )
        return out
