"""Where an image may be downloaded from: the hosts a connection allows, and the addresses they resolve to.

The copy to S3 downloads the image URLs of its ``source``, which may come from a DAG run's
conf or an XCom: unchecked, whoever may trigger a DAG could make a worker fetch an internal
address (a cloud metadata service, an internal API) and land the answer in S3.
:class:`ImageHostPolicy` allows the API's own host (and ``trusted_hosts``), fal's media CDN
and the hosts the connection lists in ``allowed_image_hosts``; anything else is refused
before a name is even looked up. fal's CDN must resolve to public addresses; the
connection's own and listed hosts may be private (the emulator, an internal mirror).

:func:`image_session` makes every connection check its host and addresses itself, at the
moment it connects, and connect to the very address it checked: a name that resolves
differently a moment later (DNS rebinding) cannot swap it, and a URL parser that reads a
host differently from ours cannot slip past, since the check sees the host the socket is for.
The session ignores the environment's proxies (``HTTP(S)_PROXY``) and ``.netrc``: a proxy
would resolve the name itself, out of reach of the address check.

fal's media hosts: fal's docs show ``https://v3.fal.media/...`` and ``https://v3b.fal.media/...``
for generated files, and older results use ``fal.media``; all are ``fal.media`` or a
subdomain of it. Not confirmed: whether fal still returns other hosts for some models
(some clients also accept ``storage.googleapis.com/falserverless``); such a host must be
listed in ``allowed_image_hosts``.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from airflow_flux.exceptions import FluxConfigError, FluxImageHostRefusedError
from airflow_flux.redact import redact_presigned

if TYPE_CHECKING:
    import requests

#: fal's media CDN (generated files): ``fal.media`` and its subdomains (``v3.fal.media``, ``v3b.fal.media``).
FAL_MEDIA_HOSTS = ("fal.media", "*.fal.media")
#: Largest image a copy downloads unless the connection's ``max_image_mib`` says otherwise.
DEFAULT_MAX_IMAGE_MIB = 256
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalize(hostname: str) -> str:
    return hostname.strip().strip("[]").rstrip(".").lower()


class HostPattern(BaseModel):
    """One allowed host: ``host``, ``host:port`` or ``*.domain`` (its subdomains).

    Without a port it matches the scheme's default port only, as ``trusted_hosts`` does.
    """

    model_config = ConfigDict(frozen=True)

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, entry: str, *, conn_id: str | None = None) -> HostPattern:
        """A pattern from ``entry``: ``host``, ``host:port``, ``[v6]:port``, ``*.domain`` or a URL."""
        from urllib.parse import urlsplit

        text = entry.strip()
        parts = urlsplit(text if "://" in text else f"//{text}")
        try:
            port = parts.port
        except ValueError:
            port = -1
        host = _normalize(parts.hostname or "")
        if not host or port == -1 or (parts.path not in ("", "/")) or "*" in host.lstrip("*."):
            raise FluxConfigError(
                f"Connection {conn_id!r}: {entry!r} in allowed_image_hosts is not a host, host:port or *.domain"
            )
        return cls(host=host, port=port)

    def matches(self, hostname: str, port: int, scheme: str) -> bool:
        host = _normalize(hostname)
        # "*.domain" matches its subdomains (".domain" suffix), not the domain itself.
        hit = host.endswith(self.host[1:]) if self.host.startswith("*.") else host == self.host
        return hit and port == (self.port if self.port is not None else _DEFAULT_PORTS.get(scheme))


def _display(hostname: str, port: int, scheme: str) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"


def is_public_address(address: str) -> bool:
    """Whether ``address`` is a public (globally routable) IP: not loopback, private, link-local, ..."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class ImageHostPolicy(BaseModel):
    """Which hosts a connection's image downloads may contact, and how large an image may be.

    :param conn_id: the connection, named in refusals (where to allow a host).
    :param own_hosts: the API's host and ``trusted_hosts``: may resolve to private addresses.
    :param listed_hosts: ``allowed_image_hosts``: may resolve to private addresses.
    :param public_hosts: fal's media CDN: must resolve to public addresses only.
    :param max_bytes: largest image downloaded, in bytes.
    """

    model_config = ConfigDict(frozen=True)

    conn_id: str | None
    own_hosts: tuple[HostPattern, ...] = ()
    listed_hosts: tuple[HostPattern, ...] = ()
    public_hosts: tuple[HostPattern, ...] = tuple(HostPattern(host=h) for h in FAL_MEDIA_HOSTS)
    max_bytes: int = DEFAULT_MAX_IMAGE_MIB * 1024 * 1024

    def _how_to_allow(self, shown: str) -> str:
        return (
            f"To allow it, add {shown!r} to the extra 'allowed_image_hosts' of connection {self.conn_id!r} "
            "(the connection form's 'Allowed image hosts')."
        )

    def _may_be_private(self, hostname: str, port: int, scheme: str) -> bool:
        return any(p.matches(hostname, port, scheme) for p in (*self.own_hosts, *self.listed_hosts))

    def check_host(self, hostname: str, port: int | None, scheme: str, *, url: str | None = None) -> None:
        """Refuse a host the connection does not allow, before anything is contacted."""
        scheme = scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise FluxImageHostRefusedError(f"Refusing to download an image over {scheme!r}: only http(s) is allowed.")
        port = port or _DEFAULT_PORTS[scheme]
        if self._may_be_private(hostname, port, scheme) or any(
            p.matches(hostname, port, scheme) for p in self.public_hosts
        ):
            return
        shown = _display(_normalize(hostname), port, scheme)
        where = f" ({redact_presigned(url[:300])})" if url else ""
        raise FluxImageHostRefusedError(
            f"Refusing to download an image from {shown!r}{where}: it is not the API's host, fal's media "
            f"CDN (fal.media) nor a host connection {self.conn_id!r} lists. Nothing was contacted. "
            + self._how_to_allow(shown)
        )

    def check_url(self, url: str) -> None:
        """Refuse ``url`` unless its host is allowed (read with the parser requests uses)."""
        from urllib3.util import parse_url

        try:
            parts = parse_url(url)
        except ValueError:
            raise FluxImageHostRefusedError(
                f"Refusing to download an image from a malformed URL: {url[:200]!r}"
            ) from None
        self.check_host(parts.host or "", parts.port, parts.scheme or "", url=url)

    def check_addresses(self, hostname: str, port: int, scheme: str, addresses: list[str]) -> None:
        """Refuse private, loopback or link-local addresses of a host that must be public."""
        if self._may_be_private(hostname, port, scheme):
            return
        private = [a for a in addresses if not is_public_address(a)]
        if private:
            shown = _display(_normalize(hostname), port, scheme)
            raise FluxImageHostRefusedError(
                f"Refusing to download an image from {shown!r}: it resolves to {', '.join(private[:3])}, "
                "not a public address (loopback, private and link-local addresses are allowed only for "
                "the connection's own host and the hosts it lists). Nothing was sent. " + self._how_to_allow(shown)
            )


def _connect_checked(conn: Any, policy: ImageHostPolicy, scheme: str) -> socket.socket:
    """Resolve the connection's host, check the host and every address, connect to a checked one."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
    from urllib3.util.connection import create_connection

    host, port = conn._dns_host, conn.port or _DEFAULT_PORTS[scheme]
    policy.check_host(host, port, scheme)
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    policy.check_addresses(host, port, scheme, addresses)
    error: OSError | None = None
    for address in addresses:
        try:
            # The address itself, not the name: nothing is resolved again between check and connect.
            sock = create_connection(
                (address, port), conn.timeout, source_address=conn.source_address, socket_options=conn.socket_options
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from exc
        except OSError as exc:
            error = exc
            continue
        sys.audit("http.client.connect", conn, conn.host, conn.port)
        return sock
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error}")


def image_session(policy: ImageHostPolicy) -> requests.Session:
    """A session for image downloads under ``policy``: no auth, no proxies, no retries of its own.

    Every connection it opens checks its host and addresses first (:func:`_connect_checked`).
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class CheckedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _connect_checked(self, policy, "http")

    class CheckedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _connect_checked(self, policy, "https")

    class CheckedHTTPPool(HTTPConnectionPool):
        ConnectionCls = CheckedHTTPConnection

    class CheckedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = CheckedHTTPSConnection

    class CheckedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": CheckedHTTPPool, "https": CheckedHTTPSPool}

    session = requests.Session()
    # No environment proxies (a proxy resolves names itself, past the address check) and no
    # .netrc credentials (image hosts get no secret of any kind).
    session.trust_env = False
    # Retries are the RetryPolicy's job; redirects are followed by open_image, host checked.
    session.mount("https://", CheckedAdapter(max_retries=0, pool_maxsize=16))
    session.mount("http://", CheckedAdapter(max_retries=0, pool_maxsize=16))
    return session
