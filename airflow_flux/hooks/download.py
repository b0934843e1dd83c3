"""Downloading generated images: public CDN URLs (never sent the token) or inline ``data:`` URIs.

:class:`ImageStream` is what the copy to S3 reads: forward only, counted, hashed and checked
against ``Content-Length``, so a half-read image can never pass for a whole one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_flux.exceptions import FluxIntegrityError, FluxTransportError
from airflow_flux.hooks.responses import MAX_DETAIL_CHARS, api_error, parse_json, transport_error

if TYPE_CHECKING:
    from collections.abc import Iterator

    import requests

    from airflow_flux.hooks.retry import RetryPolicy


def cdn_session() -> requests.Session:
    """A session of its own with no auth header: image URLs are public CDN links on hosts
    that must never see the API token."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    session.mount("https://", HTTPAdapter(max_retries=0, pool_maxsize=16))
    session.mount("http://", HTTPAdapter(max_retries=0, pool_maxsize=16))
    return session


@contextmanager
def open_image(
    session: requests.Session, url: str, *, retry_policy: RetryPolicy, timeout: float = 60.0
) -> Iterator[ImageStream]:
    """Open a generated image for streaming: a CDN URL (no token sent) or a ``data:`` URI.

    Opening follows the retry policy; the returned stream verifies the byte count
    against ``Content-Length`` and hashes what it reads (SHA-256).
    """
    if url.startswith("data:"):
        yield ImageStream.from_data_uri(url)
        return
    if urlsplit(url).scheme not in ("http", "https"):
        raise FluxIntegrityError(f"Image URL has an unsupported scheme: {url[:100]!r}")
    import requests

    what = "Image download"

    def attempt() -> requests.Response:
        try:
            resp = session.get(url, stream=True, timeout=(min(timeout, 30.0), timeout))
        except requests.RequestException as exc:
            raise transport_error(what, exc, None, True) from exc
        if resp.status_code >= 300:
            raw = resp.content[:MAX_DETAIL_CHARS]
            resp.close()
            raise api_error(resp.status_code, resp.headers, parse_json(raw), raw, what=what, request_id=None)
        return resp

    resp = retry_policy.call(attempt)
    try:
        length = resp.headers.get("Content-Length")
        yield ImageStream(
            resp.raw,
            url=url,
            content_length=int(length) if length and length.isdigit() else None,
            content_type=resp.headers.get("Content-Type"),
        )
    finally:
        resp.close()


class ImageStream:
    """A forward-only image byte stream that counts, hashes and checks its length.

    ``read(n)`` returns exactly ``n`` bytes until the end (what s3transfer expects of a
    non-seekable upload source); transport failures become :class:`FluxTransportError`
    and a short body a :class:`FluxIntegrityError`, so a half-read image can never be
    mistaken for a whole one. It has no ``seek``, so uploads stream it in parts.
    """

    def __init__(self, raw: Any, *, url: str, content_length: int | None, content_type: str | None) -> None:
        self._raw = raw
        self.url = url
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

        try:
            return self._raw.read(n) or b""
        except (OSError, urllib3.exceptions.HTTPError, RequestException) as exc:
            raise FluxTransportError(
                f"Image download broke after {self.bytes_read + len(self._head)} bytes: {type(exc).__name__}: {exc}"
            ) from exc

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
