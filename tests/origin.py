"""A real HTTP server on a loopback port of its own, standing in for a host an image URL names.

It records every request it receives (a test of "never contacted" reads :attr:`Origin.requests`)
and answers each path as told: image bytes with or without ``Content-Length`` (or without end),
or a redirect.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: The smallest bytes the copy takes for a JPEG: its magic, then padding.
JPEG_HEAD = b"\xff\xd8\xff\xe0" + b"\x00" * 12


def jpeg(size: int) -> bytes:
    """``size`` bytes that start as a JPEG does."""
    return (JPEG_HEAD + b"\x00" * size)[:size]


@dataclass
class Answer:
    body: bytes = b""
    status: int = 200
    location: str | None = None
    content_length: bool = True
    endless: bool = False


class Origin:
    """``with Origin() as origin``: listens on 127.0.0.1, port chosen by the OS; over TLS with ``tls``."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: list[tuple[str, str]] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                with origin._lock:
                    origin.requests.append((self.command, self.path))
                answer = origin.answers.get(self.path, Answer(status=404))
                self.send_response(answer.status)
                if answer.location:
                    self.send_header("Location", answer.location)
                self.send_header("Content-Type", "image/jpeg")
                if answer.content_length and not answer.endless:
                    self.send_header("Content-Length", str(len(answer.body)))
                else:
                    # No length: the body ends when the connection closes (or never).
                    self.send_header("Connection", "close")
                self.end_headers()
                # The client may hang up: what a capped download does.
                with contextlib.suppress(OSError):
                    self._write(answer)

            def _write(self, answer: Answer) -> None:
                if not answer.endless:
                    self.wfile.write(answer.body)
                    origin._sent(len(answer.body))
                    return
                self.wfile.write(JPEG_HEAD)
                chunk = b"\x00" * 65536
                while origin.bytes_sent < 1 << 31:
                    self.wfile.write(chunk)
                    origin._sent(len(chunk))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.netloc = f"127.0.0.1:{self.port}"
        self.base_url = f"{'https' if tls else 'http'}://{self.netloc}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def serve(self, path: str, answer: Answer) -> str:
        """Answer ``path`` with ``answer``; returns its URL."""
        self.answers[path] = answer
        return self.base_url + path

    def __enter__(self) -> Origin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def self_signed_tls(tmp_path: Any, hostname: str = "localhost") -> tuple[ssl.SSLContext, str]:
    """A server TLS context with a self-signed certificate for ``hostname``, and the certificate's path."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context, str(cert_path)
