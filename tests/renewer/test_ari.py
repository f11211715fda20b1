"""ARI (RFC 9773): CertID encoding and reading the suggested window from a real HTTP server."""

from __future__ import annotations

import datetime
import http.server
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from renewer.ari import (
    DEFAULT_RETRY_AFTER,
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    RenewalInfoError,
    RenewalWindow,
    cert_id,
    cert_id_from_parts,
    directory_renewal_info_url,
    fetch_renewal_window,
    parse_retry_after,
)
from renewer.errors import IssuanceError

UTC = datetime.UTC
NOW = datetime.datetime(2026, 8, 1, 12, 0, tzinfo=UTC)
# RFC 9773 section 4.1 example
RFC_AKI = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
RFC_SERIAL = 0x87654321
RFC_CERT_ID = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


def _cert(serial: int, aki: bytes | None, not_after: datetime.datetime) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "smtp.example.com")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_after - datetime.timedelta(days=90))
        .not_valid_after(not_after)
    )
    if aki is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(aki, None, None), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def test_cert_id_matches_the_rfc_example() -> None:
    assert cert_id_from_parts(RFC_AKI, RFC_SERIAL) == RFC_CERT_ID
    cert = _cert(RFC_SERIAL, RFC_AKI, NOW + datetime.timedelta(days=30))
    assert cert_id(cert) == RFC_CERT_ID
    # negative control: a serial without the high bit set gets no leading 00 byte
    assert cert_id_from_parts(RFC_AKI, 0x7765_4321).endswith(".d2VDIQ")


def test_cert_id_needs_an_authority_key_identifier() -> None:
    with pytest.raises(RenewalInfoError, match="Authority Key Identifier"):
        cert_id(_cert(5, None, NOW + datetime.timedelta(days=30)))


def test_parse_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("120", NOW) == 120
    assert parse_retry_after("Sat, 01 Aug 2026 12:10:00 GMT", NOW) == 600
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_window_helpers() -> None:
    window = RenewalWindow(NOW, NOW + datetime.timedelta(hours=2), None, 3600)
    assert window.is_open(NOW)
    assert not window.is_open(NOW - datetime.timedelta(seconds=1))
    picked = window.pick_time(random.Random(7))
    assert window.start <= picked <= window.end


@dataclass
class _Ari:
    """A renewalInfo endpoint on loopback answering what the test sets."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    base_url: str = ""


@pytest.fixture
def ari() -> Iterator[_Ari]:
    state = _Ari()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.paths.append(self.path)
            if self.path == "/directory":
                payload = json.dumps({"renewalInfo": state.base_url + "/renewalInfo"})
                self.send_response(200)
            else:
                payload = state.body
                self.send_response(state.status)
                for key, value in state.headers.items():
                    self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _window_body(start: str, end: str, **extra: str) -> str:
    return json.dumps({"suggestedWindow": {"start": start, "end": end}, **extra})


CERT = _cert(RFC_SERIAL, RFC_AKI, NOW + datetime.timedelta(days=30))


@pytest.mark.integration
def test_fetch_reads_window_explanation_and_retry_after(ari: _Ari) -> None:
    ari.body = _window_body(
        "2026-08-10T00:00:00Z", "2026-08-12T00:00:00Z", explanationURL="https://ca/why"
    )
    ari.headers = {"Retry-After": "21600"}
    with requests.Session() as session:
        url = directory_renewal_info_url(session, ari.base_url + "/directory")
        assert url == ari.base_url + "/renewalInfo"
        window = fetch_renewal_window(session, url, CERT, now=NOW)
    assert ari.paths[-1] == f"/renewalInfo/{RFC_CERT_ID}"
    assert window.start == datetime.datetime(2026, 8, 10, tzinfo=UTC)
    assert window.end == datetime.datetime(2026, 8, 12, tzinfo=UTC)
    assert window.explanation_url == "https://ca/why"
    assert window.retry_after == 21600
    assert not window.is_open(NOW)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"Retry-After": "5"}, MIN_RETRY_AFTER),
        ({"Retry-After": "9999999"}, MAX_RETRY_AFTER),
        ({}, DEFAULT_RETRY_AFTER),
        ({"Retry-After": "junk"}, DEFAULT_RETRY_AFTER),
    ],
)
def test_retry_after_is_clamped(ari: _Ari, header: dict[str, str], expected: float) -> None:
    ari.body = _window_body("2026-07-01T00:00:00Z", "2026-07-02T00:00:00Z")
    ari.headers = header
    with requests.Session() as session:
        window = fetch_renewal_window(session, ari.base_url + "/renewalInfo", CERT, now=NOW)
    assert window.retry_after == expected
    assert window.is_open(NOW)  # a window in the past means: renew now


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "body", "match", "retry"),
    [
        (
            200,
            _window_body("2026-08-12T00:00:00Z", "2026-08-12T00:00:00Z"),
            "not after",
            DEFAULT_RETRY_AFTER,
        ),
        (200, '{"suggestedWindow": {"start": "x"}}', "malformed", DEFAULT_RETRY_AFTER),
        (200, "not json", "malformed", DEFAULT_RETRY_AFTER),
        (404, '{"type": "urn:ietf:params:acme:error:malformed"}', "HTTP 404", DEFAULT_RETRY_AFTER),
        (503, "", "HTTP 503", 300),
    ],
)
def test_bad_answers_raise_renewal_info_error(
    ari: _Ari, status: int, body: str, match: str, retry: float
) -> None:
    ari.status, ari.body = status, body
    with requests.Session() as session, pytest.raises(RenewalInfoError, match=match) as info:
        fetch_renewal_window(session, ari.base_url + "/renewalInfo", CERT, now=NOW)
    assert isinstance(info.value, IssuanceError)
    assert info.value.retry_after == retry


@pytest.mark.integration
def test_expired_certificate_is_not_asked(ari: _Ari) -> None:
    expired = _cert(3, RFC_AKI, NOW - datetime.timedelta(days=1))
    with requests.Session() as session, pytest.raises(RenewalInfoError, match="expired"):
        fetch_renewal_window(session, ari.base_url + "/renewalInfo", expired, now=NOW)
    assert ari.paths == []


def test_connection_refused_is_a_renewal_info_error() -> None:
    with requests.Session() as session, pytest.raises(RenewalInfoError, match="ConnectionError"):
        fetch_renewal_window(session, "http://127.0.0.1:9/renewalInfo", CERT, now=NOW)
