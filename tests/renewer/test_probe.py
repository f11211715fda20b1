"""renewer.probe: endpoint syntax, and what real SMTP servers on loopback present."""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
import trustme
from cryptography import x509

from emulators.smtp_server import SmtpServer
from renewer.certs import fingerprint_sha256
from renewer.errors import ConfigError, ProbeError
from renewer.probe import Endpoint, probe_endpoint


@pytest.mark.parametrize(
    ("text", "host", "port", "mode", "shown"),
    [
        ("smtp.example.com:587", "smtp.example.com", 587, "starttls", "smtp.example.com:587"),
        ("smtp.example.com:25", "smtp.example.com", 25, "starttls", "smtp.example.com:25"),
        ("smtp.example.com:465", "smtp.example.com", 465, "tls", "smtp.example.com:465"),
        (
            "SMTP.Example.com:465/starttls",
            "smtp.example.com",
            465,
            "starttls",
            "smtp.example.com:465/starttls",
        ),
        ("127.0.0.1:4650/tls", "127.0.0.1", 4650, "tls", "127.0.0.1:4650/tls"),
        ("127.0.0.1:2525/starttls", "127.0.0.1", 2525, "starttls", "127.0.0.1:2525"),
        ("[::1]:25", "::1", 25, "starttls", "[::1]:25"),
        ("[2001:db8::1]:465", "2001:db8::1", 465, "tls", "[2001:db8::1]:465"),
        ("mx.example.com.:25", "mx.example.com.", 25, "starttls", "mx.example.com.:25"),
    ],
)
def test_parse_and_show(text: str, host: str, port: int, mode: str, shown: str) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.host, endpoint.port, endpoint.mode) == (host, port, mode)
    assert str(endpoint) == shown
    assert Endpoint.parse(str(endpoint)) == endpoint  # what we print parses back


@pytest.mark.parametrize(
    "text",
    [
        "",
        "smtp.example.com",  # no port
        ":25",
        "smtp.example.com:",
        "smtp.example.com:0",
        "smtp.example.com:65536",
        "smtp.example.com:2x5",
        "smtp.example.com:+25",
        "smtp.example.com:25/ssl",
        "smtp.example.com:25/",
        "::1:25",  # IPv6 without brackets
        "[::1]25",
        "[not-an-address]:25",
        "smtp example.com:25",
        "smtp.example.com:25\n",
        "smtp.example.com;rm -rf /:25",
        "$(reboot):25",
        "-smtp.example.com:25",
        "bücher.example:25",  # IDN must be given as xn--
        "a" * 64 + ".example.com:25",
        "x" * 400 + ":25",
        "https://smtp.example.com:25",
    ],
)
def test_parse_rejects_bad_input(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Endpoint.parse(text, "certificates[0].endpoints[2]")
    assert caught.value.field == "certificates[0].endpoints[2]"
    assert "expected host:port" in str(caught.value)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(ConfigError, match=r"endpoints\[0\].*got int"):
        Endpoint.parse(25, "endpoints[0]")


# ------------------------------------------------------------ against real servers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Issued:
    ca: trustme.CA
    key_b64: str
    chain_b64: str
    leaf: x509.Certificate
    intermediates: list[x509.Certificate]


def _issue(ca: trustme.CA, *names: str, **kwargs: Any) -> Issued:
    cert = ca.issue_cert(*names, **kwargs)
    pem = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    chain = x509.load_pem_x509_certificates(pem)
    return Issued(ca, _b64(cert.private_key_pem.bytes()), _b64(pem), chain[0], chain[1:])


@pytest.fixture(scope="module")
def issued() -> Issued:
    return _issue(trustme.CA().create_child_ca(), "smtp.example.com", "mx.example.com")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_probe_reads_leaf_and_chain(issued: Issued, mode: Literal["starttls", "tls"]) -> None:
    with SmtpServer([(0, mode)], issued.key_b64, issued.chain_b64) as server:
        endpoint = Endpoint("127.0.0.1", server.ports[0], mode)
        served = probe_endpoint(endpoint, "smtp.example.com", timeout=5)
    assert served.endpoint == endpoint
    assert fingerprint_sha256(served.leaf) == fingerprint_sha256(issued.leaf)
    assert served.chain == tuple(issued.intermediates)  # as sent, after the leaf
    assert len(served.chain) == 1


@pytest.mark.integration
def test_probe_wrong_mode_is_a_clear_error(issued: Issued) -> None:
    # Negative control for the test above: the same servers, spoken to in the wrong mode.
    with SmtpServer([(0, "starttls"), (0, "tls")], issued.key_b64, issued.chain_b64) as server:
        plain, implicit = server.ports
        with pytest.raises(ProbeError, match=rf"127\.0\.0\.1:{plain}/tls: TLS handshake failed"):
            probe_endpoint(Endpoint("127.0.0.1", plain, "tls"), "smtp.example.com", timeout=3)
        # A TLS server waits for a ClientHello while we wait for its greeting.
        with pytest.raises(ProbeError, match=rf":{implicit}: no answer within 1s while waiting"):
            probe_endpoint(Endpoint("127.0.0.1", implicit, "starttls"), "x", timeout=1)


@pytest.mark.integration
def test_probe_reports_bad_certificates_instead_of_raising() -> None:
    # An expired or wrong-name certificate is what the endpoint serves: returned, for
    # decide/check to judge (issue 5, "Untrusted answers").
    ca = trustme.CA()
    now = datetime.now(UTC)
    expired = _issue(
        ca,
        "old.example.com",
        not_before=now - timedelta(days=100),
        not_after=now - timedelta(days=10),
    )
    with SmtpServer([(0, "starttls")], expired.key_b64, expired.chain_b64) as server:
        served = probe_endpoint(Endpoint("127.0.0.1", server.ports[0], "starttls"), "smtp.x")
    assert served.leaf.not_valid_after_utc < now
    assert fingerprint_sha256(served.leaf) == fingerprint_sha256(expired.leaf)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_probe_over_ipv6(issued: Issued) -> None:
    with SmtpServer([(0, "starttls")], issued.key_b64, issued.chain_b64, host="::1") as server:
        endpoint = Endpoint.parse(f"[::1]:{server.ports[0]}")
        served = probe_endpoint(endpoint, "smtp.example.com", timeout=5)
    assert fingerprint_sha256(served.leaf) == fingerprint_sha256(issued.leaf)
    assert str(served.endpoint) == f"[::1]:{server.ports[0]}"


# ------------------------------------------------- untrusted answers (issue 5)


class RawServer:
    """A TCP listener on 127.0.0.1:0 whose connections are handled by ``behave``."""

    def __init__(self, behave: Callable[[socket.socket, threading.Event], None]) -> None:
        self.behave = behave
        self.stopping = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    self.behave(conn, self.stopping)

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.listener.close()


def _read_command(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def _garbage(conn: socket.socket, _stop: threading.Event) -> None:
    conn.sendall(b"\x00\xff\xfeHELLO this is not smtp\r\n")
    _read_command(conn)


def _http(conn: socket.socket, _stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def _silent(conn: socket.socket, stop: threading.Event) -> None:
    stop.wait(10)


def _trickle(conn: socket.socket, stop: threading.Event) -> None:
    # A greeting that never ends: one continuation line every 0.1 s.
    while not stop.wait(0.1):
        conn.sendall(b"220-still greeting\r\n")


def _no_starttls(conn: socket.socket, _stop: threading.Event) -> None:
    conn.sendall(b"220 plain.example.com ESMTP\r\n")
    assert _read_command(conn).startswith(b"EHLO ")
    conn.sendall(b"250-plain.example.com\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n")
    if _read_command(conn).startswith(b"QUIT"):
        conn.sendall(b"221 bye\r\n")


def _starttls_then(after: Callable[[socket.socket], None], reply: bytes = b"220 go\r\n") -> Any:
    def behave(conn: socket.socket, _stop: threading.Event) -> None:
        conn.sendall(b"220 mx.example.com ESMTP\r\n")
        _read_command(conn)
        conn.sendall(b"250-mx.example.com\r\n250 STARTTLS\r\n")
        _read_command(conn)
        conn.sendall(reply)
        after(conn)

    return behave


def _close_after_client_hello(conn: socket.socket) -> None:
    conn.recv(4096)  # the ClientHello, then hang up mid-handshake


def _refuse_starttls(conn: socket.socket) -> None:
    pass


def _unavailable(conn: socket.socket, _stop: threading.Event) -> None:
    conn.sendall(b"554 5.3.2 not accepting mail\r\n")


def _implicit_close(conn: socket.socket, _stop: threading.Event) -> None:
    conn.recv(4096)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("behave", "mode", "message"),
    [
        (_garbage, "starttls", r"not an SMTP reply while waiting for the greeting"),
        (_http, "starttls", r"not an SMTP reply .*HTTP/1\.1 400"),
        (_http, "tls", r"TLS handshake failed|connection closed during the TLS handshake"),
        (_no_starttls, "starttls", r"does not offer STARTTLS"),
        (_unavailable, "starttls", r"greeting 554 .*expected 220"),
        (
            _starttls_then(_close_after_client_hello),
            "starttls",
            r"connection closed during the TLS handshake",
        ),
        (_implicit_close, "tls", r"connection closed during the TLS handshake"),
        (
            _starttls_then(_refuse_starttls, b"454 4.7.0 TLS not available\r\n"),
            "starttls",
            r"STARTTLS answered 454",
        ),
        (
            _starttls_then(_refuse_starttls, b"220 go\r\n\x16\x03\x01injected"),
            "starttls",
            r"unexpected data after STARTTLS 220",
        ),
    ],
    ids=[
        "garbage",
        "http-on-starttls",
        "http-on-tls",
        "no-starttls",
        "greeting-554",
        "close-mid-handshake",
        "close-mid-implicit-handshake",
        "starttls-454",
        "starttls-injection",
    ],
)
def test_untrusted_answers_give_a_probe_error(
    behave: Callable[[socket.socket, threading.Event], None],
    mode: Literal["starttls", "tls"],
    message: str,
) -> None:
    with RawServer(behave) as server:
        endpoint = Endpoint("127.0.0.1", server.port, mode)
        started = time.monotonic()
        with pytest.raises(ProbeError) as caught:
            probe_endpoint(endpoint, "smtp.example.com", timeout=3)
        elapsed = time.monotonic() - started
    assert re.search(message, str(caught.value)), str(caught.value)
    assert str(caught.value).startswith(f"{endpoint}: ")  # names the endpoint
    assert elapsed < 3


@pytest.mark.integration
@pytest.mark.parametrize("behave", [_silent, _trickle], ids=["never-answers", "trickles"])
@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_slow_servers_are_bounded_by_the_timeout(
    behave: Callable[[socket.socket, threading.Event], None],
    mode: Literal["starttls", "tls"],
) -> None:
    timeout = 0.8
    with RawServer(behave) as server:
        started = time.monotonic()
        with pytest.raises(
            ProbeError, match=r"no answer within 0\.8s|TLS handshake failed"
        ) as caught:
            probe_endpoint(
                Endpoint("127.0.0.1", server.port, mode), "smtp.example.com", timeout=timeout
            )
        elapsed = time.monotonic() - started
    print(f"{behave.__name__}/{mode}: gave up after {elapsed:.2f}s: {caught.value}")
    assert elapsed < timeout + 0.5
    if "no answer" in str(caught.value):
        assert elapsed >= timeout * 0.9


@pytest.mark.integration
def test_refused_port_and_unresolvable_host() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ProbeError, match=rf"127\.0\.0\.1:{port}: connection refused"):
            probe_endpoint(Endpoint("127.0.0.1", port, "starttls"), "smtp.example.com")
    with pytest.raises(ProbeError, match="cannot resolve"):
        probe_endpoint(Endpoint("does-not-exist.invalid", 25, "starttls"), "x", timeout=3)
    # Built directly (Endpoint.parse refuses it): a label the resolver cannot encode.
    with pytest.raises(ProbeError, match="cannot connect"):
        probe_endpoint(Endpoint("a" * 70 + ".example", 25, "starttls"), "x", timeout=3)
