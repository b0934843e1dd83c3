"""Which hosts an image download may contact, against real servers on loopback ports.

The emulator is the connection's host; :class:`~tests.origin.Origin` servers stand in for
other hosts, and count what reaches them.
"""

from __future__ import annotations

import base64

import pytest
import requests

from airflow_flux.exceptions import (
    FluxConfigError,
    FluxImageHostRefusedError,
    FluxImageTooLargeError,
    FluxIntegrityError,
)
from airflow_flux.hooks import FluxHook
from airflow_flux.hooks.egress import HostPattern, ImageHostPolicy, image_session, is_public_address
from tests.helpers import FAST_RETRY
from tests.origin import Answer, Origin, jpeg, self_signed_tls


def _hook(conn_id: str) -> FluxHook:
    return FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY)


def _read(hook: FluxHook, url: str) -> bytes:
    with hook.open_image(url) as stream:
        return stream.read()


def test_a_host_the_connection_does_not_allow_is_never_contacted(flux_conn):
    with Origin() as other:
        url = other.serve("/x.jpg", Answer(body=jpeg(100)))
        hook = _hook(flux_conn)
        for form in (url, url.replace("127.0.0.1", "localhost")):
            with pytest.raises(FluxImageHostRefusedError) as err:
                _read(hook, form)
            message = str(err.value)
            assert repr(form.split("/")[2]) in message and "allowed_image_hosts" in message
            assert repr(flux_conn) in message and "Nothing was contacted" in message
        assert other.requests == []


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # a cloud metadata service
        "http://[::1]:9/x.jpg",
        "http://10.0.0.1/x.jpg",
        "https://fal.media.evil.example/x.jpg",
        "https://evilfal.media/x.jpg",
        "https://v3.fal.media:8443/x.jpg",  # fal's host, not fal's port
    ],
)
def test_hosts_not_allowed_are_refused_naming_them(flux_conn, url):
    with pytest.raises(FluxImageHostRefusedError, match="allowed_image_hosts") as err:
        _read(_hook(flux_conn), url)
    assert url.split("/")[2].lower() in str(err.value)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://v3.fal.media/x.jpg", "gopher://127.0.0.1/"])
def test_other_schemes_are_refused(flux_conn, url):
    with pytest.raises(FluxIntegrityError, match="unsupported scheme"):
        _read(_hook(flux_conn), url)


def test_the_connections_own_host_and_a_listed_host_are_downloaded(emulator, make_flux_conn):
    with Origin() as listed, Origin() as wildcard_port:
        conn = make_flux_conn(emulator.base_url, allowed_image_hosts=f"{listed.netloc}, cdn.example.com")
        body = jpeg(5000)
        assert _read(_hook(conn), listed.serve("/a.jpg", Answer(body=body))) == body
        assert listed.requests == [("GET", "/a.jpg")]
        # A host without a port is allowed on its scheme's default port only.
        with pytest.raises(FluxImageHostRefusedError):
            _read(_hook(conn), wildcard_port.serve("/b.jpg", Answer(body=body)).replace("127.0.0.1", "cdn.example.com"))
        assert wildcard_port.requests == []


def test_a_list_in_the_extra_and_wildcards(emulator, make_flux_conn):
    with Origin() as listed:
        conn = make_flux_conn(emulator.base_url, allowed_image_hosts=["*.example.com", f"localhost:{listed.port}"])
        body = jpeg(300)
        url = listed.serve("/c.jpg", Answer(body=body)).replace("127.0.0.1", "localhost")
        assert _read(_hook(conn), url) == body
        policy = _hook(conn).image_policy
        policy.check_url("https://img.example.com/x.png")
        with pytest.raises(FluxImageHostRefusedError):
            policy.check_url("https://example.com/x.png")  # "*.domain" is its subdomains only


def test_fals_media_hosts_are_allowed_by_default(flux_conn):
    policy = _hook(flux_conn).image_policy
    for url in ("https://v3.fal.media/files/a/b.png", "https://v3b.fal.media/files/x.jpg", "https://fal.media/f.png"):
        policy.check_url(url)


def test_a_redirect_to_a_host_not_allowed_is_refused_without_contacting_it(emulator, make_flux_conn):
    with Origin() as listed, Origin() as target:
        conn = make_flux_conn(emulator.base_url, allowed_image_hosts=listed.netloc)
        hop = listed.serve("/hop", Answer(status=302, location=target.serve("/secret", Answer(body=jpeg(10)))))
        with pytest.raises(FluxImageHostRefusedError, match=repr(target.netloc)):
            _read(_hook(conn), hop)
        assert listed.requests == [("GET", "/hop")]
        assert target.requests == []
        # Relative and absolute redirects to allowed hosts are followed.
        body = jpeg(2000)
        listed.serve("/final.jpg", Answer(body=body))
        relative = listed.serve("/rel", Answer(status=301, location="/final.jpg"))
        assert _read(_hook(conn), relative) == body


def test_a_redirect_loop_ends(emulator, make_flux_conn):
    with Origin() as listed:
        conn = make_flux_conn(emulator.base_url, allowed_image_hosts=listed.netloc)
        loop = listed.serve("/loop", Answer(status=302, location="/loop"))
        with pytest.raises(Exception, match="more than 5 redirects"):
            _read(_hook(conn), loop)
        assert len(listed.requests) == 6


def test_the_session_checks_the_host_it_connects_to_itself():
    # Past open_image's own check (as a URL another parser reads differently would be): the
    # connection refuses a host the policy does not allow before its socket is opened.
    with Origin() as other:
        session = image_session(ImageHostPolicy(conn_id="c"))
        with pytest.raises(FluxImageHostRefusedError, match=repr(other.netloc)):
            session.get(other.serve("/x.jpg", Answer(body=jpeg(10))), timeout=5)
        assert other.requests == []


def test_a_host_that_must_be_public_is_refused_when_it_resolves_to_loopback():
    # "localhost" on the origin's port stands in for a fal CDN name that resolves to a private
    # address: the name is allowed, the address it resolves to is not. Nothing is sent.
    with Origin() as other:
        policy = ImageHostPolicy(conn_id="c", public_hosts=(HostPattern(host="localhost", port=other.port),))
        url = other.serve("/x.jpg", Answer(body=jpeg(10))).replace("127.0.0.1", "localhost")
        policy.check_url(url)  # the host is allowed...
        with pytest.raises(FluxImageHostRefusedError, match="not a public address"):
            image_session(policy).get(url, timeout=5)  # ...its address is not
        assert other.requests == []
        # Listed, the same host may be private.
        listed = policy.model_copy(update={"listed_hosts": (HostPattern(host="localhost", port=other.port),)})
        assert image_session(listed).get(url, timeout=5).content == jpeg(10)


def test_public_addresses():
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700::1111")
    for private in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "::1"):
        assert not is_public_address(private), private
    assert not is_public_address("fe80::1%eth0") and not is_public_address("::ffff:127.0.0.1")
    assert not is_public_address("0.0.0.0") and not is_public_address("224.0.0.1")


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "no-content-length"])
def test_an_image_over_the_cap_fails(emulator, make_flux_conn, with_length):
    with Origin() as listed:
        conn = make_flux_conn(emulator.base_url, allowed_image_hosts=listed.netloc, max_image_mib=1)
        answer = Answer(body=jpeg(3 << 20)) if with_length else Answer(endless=True)
        url = listed.serve("/big.jpg", answer)
        with pytest.raises(FluxImageTooLargeError, match="max_image_mib") as err:
            _read(_hook(conn), url)
        assert "1 MiB" in str(err.value)
        if not with_length:
            # The endless answer was not read without bound: the origin sent the cap and what
            # socket buffers held before the client hung up.
            assert listed.bytes_sent < 16 << 20
        # Under the cap, with or without a length: read whole.
        small = jpeg((1 << 20) - 10)
        assert _read(_hook(conn), listed.serve("/ok.jpg", Answer(body=small, content_length=with_length))) == small


def test_a_data_uri_over_the_cap_fails(emulator, make_flux_conn):
    conn = make_flux_conn(emulator.base_url, max_image_mib=0.001)  # 1048 bytes
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg(2000)).decode()
    with pytest.raises(FluxImageTooLargeError):
        _read(_hook(conn), uri)
    small = jpeg(1000)
    assert _read(_hook(conn), "data:image/jpeg;base64," + base64.b64encode(small).decode()) == small


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"allowed_image_hosts": "cdn.example.com/path"}, "'cdn.example.com/path' in allowed_image_hosts"),
        ({"allowed_image_hosts": "host:port"}, "'host:port' in allowed_image_hosts"),
        ({"allowed_image_hosts": "a.*.example.com"}, "'a.*.example.com' in allowed_image_hosts"),
        ({"max_image_mib": 0}, "max_image_mib must be a positive number"),
        ({"max_image_mib": "lots"}, "max_image_mib must be a positive number"),
    ],
)
def test_bad_extras_are_refused_naming_them(emulator, make_flux_conn, extra, message):
    with pytest.raises(FluxConfigError, match=message.replace("*", r"\*").replace(".", r"\.")):
        _ = _hook(make_flux_conn(emulator.base_url, **extra)).settings


def test_without_the_connection_only_fals_cdn_is_allowed(flux_conn):
    hook = _hook("flux_no_such_connection")
    hook.image_policy.check_url("https://v3.fal.media/files/a.png")
    with pytest.raises(FluxImageHostRefusedError, match="'flux_no_such_connection'"):
        hook.image_policy.check_url("http://127.0.0.1:1/x.jpg")


def test_https_is_verified_against_the_name_while_connecting_to_the_checked_address(tmp_path):
    # The socket goes to the address that was checked; TLS still verifies the certificate
    # against the URL's name (SNI and hostname check), not against that address.
    tls, ca = self_signed_tls(tmp_path, "localhost")
    with Origin(tls=tls) as origin:
        body = jpeg(1234)
        url = origin.serve("/s.jpg", Answer(body=body)).replace("127.0.0.1", "localhost")
        policy = ImageHostPolicy(conn_id="c", listed_hosts=(HostPattern(host="localhost", port=origin.port),))
        session = image_session(policy)
        session.verify = ca
        assert session.get(url, timeout=5).content == body
        # The certificate names localhost, not 127.0.0.1: refused by TLS, as it should be.
        by_ip = policy.model_copy(update={"listed_hosts": (HostPattern(host="127.0.0.1", port=origin.port),)})
        session = image_session(by_ip)
        session.verify = ca
        with pytest.raises(requests.exceptions.SSLError):
            session.get(url.replace("localhost", "127.0.0.1"), timeout=5)
