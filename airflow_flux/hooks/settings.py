"""The ``flux`` connection, resolved once: base URL, token, auth scheme, and which hosts may see the token.

:class:`FluxConnectionSettings` is the one place that decides where the token may be sent:
:meth:`~FluxConnectionSettings.resolve` either re-bases a URL the API returned onto the
connection's host (aggregators) or refuses a URL on a host that is neither the
connection's nor trusted, so the token never leaves the configured API hosts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow_flux.exceptions import FluxConfigError, FluxUntrustedURLError
from airflow_flux.families.common import Prices
from airflow_flux.hooks.egress import DEFAULT_MAX_IMAGE_MIB, HostPattern, ImageHostPolicy
from airflow_flux.models import KONTEXT_TEXT_TO_IMAGE

if TYPE_CHECKING:
    from airflow.sdk import Connection

DEFAULT_BASE_URL = "https://queue.fal.run"
#: fal's own queue hosts: a connection on one of them uses ``Key`` auth and trusts both.
FAL_QUEUE_HOSTS: frozenset[str] = frozenset({"queue.fal.run", "queue.falrun.com"})
DEFAULT_TIMEOUT = 60.0


def _is_fal_host(hostname: str) -> bool:
    return hostname in FAL_QUEUE_HOSTS or hostname.endswith((".fal.run", ".falrun.com"))


#: The connection form's choice meaning "decide from the host", as an absent extra does.
AUTO = "auto"
_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in _ON
    return bool(value)


def _host_key(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port


@dataclass(frozen=True)
class FluxConnectionSettings:
    """Everything the hook needs from a ``flux`` connection, resolved once.

    Build it with :meth:`from_connection`; ``token`` is excluded from ``repr`` so the
    settings can be logged.
    """

    base_url: str
    token: str = field(repr=False)
    auth_scheme: str
    endpoint: str
    rebase_urls: bool
    trusted_hosts: frozenset[str]
    timeout: float
    #: False: fal keeps no copy of the request's input and output payloads (``X-Fal-Store-IO: 0``).
    store_io: bool = True
    #: Seconds fal's CDN keeps generated files (``X-Fal-Object-Lifecycle-Preference``); None: fal's default.
    media_expires_in: int | None = None
    #: What one image costs on this connection (an aggregator's price); None: the published price.
    price_per_image: float | None = None
    #: What one megapixel costs on this connection (endpoints priced per megapixel); None: published.
    price_per_megapixel: float | None = None
    #: Requests the account runs at once (``concurrency``); None: not said.
    concurrency: int | None = None
    #: Where images may be downloaded from and how large they may be (``allowed_image_hosts``,
    #: ``max_image_mib``); None: fal's media CDN only, the default size cap.
    image_policy: ImageHostPolicy | None = None

    @property
    def prices(self) -> Prices:
        """This connection's own prices, overriding the published ones where set."""
        return Prices(per_image=self.price_per_image, per_megapixel=self.price_per_megapixel)

    @classmethod
    def from_connection(cls, conn: Connection) -> FluxConnectionSettings:
        extra = conn.extra_dejson or {}

        def opt(name: str, default: Any = None, *, auto: bool = False) -> Any:
            # The connection form stores declarative fields with or without the prefix, and
            # saves every field: None for an empty one, "auto" for a choice that depends on
            # the host (``auto``). Each means the same as the key being absent.
            unset: tuple[Any, ...] = (None, "", AUTO) if auto else (None, "")
            for key in (name, f"extra__flux__{name}"):
                value = extra.get(key)
                if (value.strip().lower() if isinstance(value, str) else value) not in unset:
                    return value
            return default

        base_url = cls._base_url(conn)
        hostname = (urlsplit(base_url).hostname or "").lower()
        fal = _is_fal_host(hostname)

        scheme = str(opt("auth_scheme", "Key" if fal else "Bearer", auto=True)).strip()
        normalized = {"key": "Key", "bearer": "Bearer"}.get(scheme.lower())
        if normalized is None:
            raise FluxConfigError(
                f"Connection {conn.conn_id!r}: extra auth_scheme must be 'Bearer' or 'Key', got {scheme!r}"
            )

        trusted = opt("trusted_hosts", [])
        if isinstance(trusted, str):
            trusted = [h for h in trusted.replace(",", " ").split() if h]
        hosts = {urlsplit(base_url).netloc.lower()}
        if fal:
            hosts |= FAL_QUEUE_HOSTS
        hosts |= {str(h).strip().lower() for h in trusted}

        try:
            timeout = float(opt("timeout", DEFAULT_TIMEOUT))
        except (TypeError, ValueError):
            raise FluxConfigError(f"Connection {conn.conn_id!r}: extra timeout must be a number of seconds") from None

        def number(name: str, kind: type[float] | type[int]) -> Any:
            value = opt(name)
            if value is None:
                return None
            try:
                parsed = kind(value)
            except (TypeError, ValueError):
                parsed = -1
            if parsed < 0 or (kind is int and parsed == 0):
                whats = {"media_expires_in": "a positive number of seconds", "concurrency": "a positive whole number"}
                what = whats.get(name, "a number of US dollars, 0 or more")
                raise FluxConfigError(f"Connection {conn.conn_id!r}: extra {name} must be {what}, got {value!r}")
            return parsed

        return cls(
            # Only a flux connection lends its hosts to image downloads: a result or handle may
            # name its connection, and another type's host (an internal API's) must not be reachable.
            image_policy=cls._image_policy(
                conn.conn_id,
                hosts if conn.conn_type == "flux" else set(),
                opt("allowed_image_hosts", []) if conn.conn_type == "flux" else [],
                opt("max_image_mib"),
            ),
            base_url=base_url,
            token=conn.password or "",
            auth_scheme=normalized,
            endpoint=str(opt("endpoint", KONTEXT_TEXT_TO_IMAGE)).strip("/"),
            rebase_urls=cls._switch(conn.conn_id, "rebase_urls", opt("rebase_urls", not fal, auto=True)),
            trusted_hosts=frozenset(hosts),
            timeout=timeout,
            store_io=_as_bool(opt("store_io", True)),
            media_expires_in=number("media_expires_in", int),
            price_per_image=number("price_per_image", float),
            price_per_megapixel=number("price_per_megapixel", float),
            concurrency=number("concurrency", int),
        )

    @staticmethod
    def _image_policy(conn_id: str | None, own: set[str], listed: Any, max_mib: Any) -> ImageHostPolicy:
        """The image download policy: the API's hosts, ``allowed_image_hosts``, ``max_image_mib``."""
        if isinstance(listed, str):
            listed = [h for h in listed.replace(",", " ").split() if h]
        try:
            mib = float(DEFAULT_MAX_IMAGE_MIB if max_mib is None else max_mib)
        except (TypeError, ValueError):
            mib = -1
        if not mib > 0:
            raise FluxConfigError(
                f"Connection {conn_id!r}: extra max_image_mib must be a positive number, got {max_mib!r}"
            )
        # No conn_id: settings compare by what they do; the hook names its connection.
        return ImageHostPolicy(
            conn_id=None,
            own_hosts=tuple(HostPattern.parse(h, conn_id=conn_id) for h in sorted(own)),
            listed_hosts=tuple(HostPattern.parse(str(h), conn_id=conn_id) for h in listed),
            max_bytes=int(mib * 1024 * 1024),
        )

    @staticmethod
    def _switch(conn_id: str | None, name: str, value: Any) -> bool:
        """A boolean extra: true/false, or the form's on/off (also yes/no, 1/0)."""
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in _ON or word in _OFF:
            return word in _ON
        # Refused rather than read as off: a typo would otherwise silently change where
        # the returned URLs go.
        raise FluxConfigError(f"Connection {conn_id!r}: extra {name} must be auto, on or off, got {value!r}")

    @staticmethod
    def _base_url(conn: Connection) -> str:
        host = (conn.host or "").strip()
        if not host:
            return DEFAULT_BASE_URL
        if "://" not in host:
            # URI-style connections split the URL: rebuild it (schema carries the scheme,
            # as in the http provider).
            scheme = (conn.schema or "https").strip()
            host = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FluxConfigError(f"Connection {conn.conn_id!r}: host must be an http(s) base URL, got {host!r}")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"{self.auth_scheme} {self.token}", "Accept": "application/json"}

    @property
    def submit_headers(self) -> dict[str, str]:
        """The account-wide policy headers every submit on this connection sends."""
        headers = {}
        if not self.store_io:
            headers["X-Fal-Store-IO"] = "0"
        if self.media_expires_in is not None:
            headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(
                {"expiration_duration_seconds": self.media_expires_in}
            )
        return headers

    def is_trusted(self, url: str) -> bool:
        parts = urlsplit(url)
        base = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https"):
            return False
        # Never downgrade to plain http on a host the base reaches over https.
        if parts.scheme == "http" and base.scheme == "https":
            return False
        hostname, port = _host_key(url)
        return parts.netloc.lower() in self.trusted_hosts or (port is None and hostname in self.trusted_hosts)

    def rebase(self, url: str) -> str:
        """Move ``url`` onto the connection's base URL, keeping path and query."""
        parts = urlsplit(url)
        base = urlsplit(self.base_url)
        path = parts.path
        if base.path and not (parts.netloc.lower() == base.netloc.lower() and path.startswith(base.path + "/")):
            path = base.path + path
        return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))

    def resolve(self, url: str) -> str:
        """The URL to call with the token, or :class:`FluxUntrustedURLError`.

        With ``rebase_urls`` every returned URL is re-based (aggregators return fal's
        hosts and ask callers to rewrite them); without it, a URL on an untrusted host is
        refused rather than called, so the token cannot leak there.
        """
        if self.rebase_urls:
            return self.rebase(url)
        if not self.is_trusted(url):
            host = urlsplit(url).netloc or url
            raise FluxUntrustedURLError(
                f"Refusing to send the API token to {host!r}: it is not the connection's host "
                f"({urlsplit(self.base_url).netloc}) nor in its trusted_hosts. Set extra "
                "'rebase_urls': true for an aggregator, or add the host to 'trusted_hosts'."
            )
        return url
