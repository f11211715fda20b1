"""renewer.selftest: a real STARTTLS handshake against the exact values to be deployed."""

from __future__ import annotations

import base64
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from renewer.certs import ChainError, fingerprint_sha256
from renewer.errors import CertificateInvalidError
from renewer.selftest import decode_b64_pem, handshake_selftest, ssl_server_context
from renewer.sensitive import Secret

NOW = datetime.now(UTC)
SNI = "smtp.example.com"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pair(ca: trustme.CA, *names: str) -> tuple[Secret, str, x509.Certificate]:
    leaf = ca.issue_cert(*(names or (SNI,)))
    pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return (
        Secret(_b64(leaf.private_key_pem.bytes())),
        _b64(pem),
        x509.load_pem_x509_certificate(pem),
    )


def _root(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


@pytest.fixture(scope="module")
def root_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def issuing_ca(root_ca: trustme.CA) -> trustme.CA:
    return root_ca.create_child_ca()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.integration
def test_good_pair_passes(
    root_ca: trustme.CA, issuing_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    key, chain, leaf = _pair(issuing_ca, SNI, "mx.example.com")
    threads, fds = threading.active_count(), _open_fds()
    with caplog.at_level(logging.DEBUG):
        seen = handshake_selftest(key, chain, SNI, [_root(root_ca)], now=NOW, timeout=5)
    assert seen == fingerprint_sha256(leaf)
    assert "TLS self-test passed" in caplog.text
    assert key.reveal() not in caplog.text
    # The server was stopped: no thread or descriptor (socket, memfd) left behind.
    assert threading.active_count() == threads
    assert _open_fds() <= fds


@pytest.mark.integration
def test_mismatched_key_and_chain_fail(issuing_ca: trustme.CA, root_ca: trustme.CA) -> None:
    key_a, _, _ = _pair(issuing_ca)
    _, chain_b, _ = _pair(issuing_ca)
    with pytest.raises(CertificateInvalidError, match="private key does not match") as caught:
        handshake_selftest(key_a, chain_b, SNI, [_root(root_ca)], now=NOW, timeout=5)
    assert key_a.reveal() not in str(caught.value)


@pytest.mark.integration
def test_chain_from_another_ca_fails(issuing_ca: trustme.CA) -> None:
    key, chain, _ = _pair(issuing_ca)
    other = trustme.CA()
    with pytest.raises(ChainError, match=r"does not verify for smtp\.example\.com"):
        handshake_selftest(key, chain, SNI, [_root(other)], now=NOW, timeout=5)


@pytest.mark.integration
def test_wrong_name_and_wrong_time_fail(issuing_ca: trustme.CA, root_ca: trustme.CA) -> None:
    key, chain, _ = _pair(issuing_ca, "other.example.org")
    roots = [_root(root_ca)]
    handshake_selftest(key, chain, "other.example.org", roots, now=NOW, timeout=5)
    with pytest.raises(CertificateInvalidError, match=r"smtp\.example\.com"):
        handshake_selftest(key, chain, SNI, roots, now=NOW, timeout=5)
    # trustme's certificates are valid from 2000 to 3000: before that, not yet valid.
    with pytest.raises(CertificateInvalidError, match="does not verify"):
        handshake_selftest(
            key, chain, "other.example.org", roots, now=datetime(1999, 1, 1, tzinfo=UTC), timeout=5
        )


@pytest.mark.integration
def test_leaf_only_chain_fails_to_verify(issuing_ca: trustme.CA, root_ca: trustme.CA) -> None:
    # A FULLCHAIN without the intermediate is what breaks strict SMTP clients.
    cert = issuing_ca.issue_cert(SNI)
    key = Secret(_b64(cert.private_key_pem.bytes()))
    leaf_only = _b64(cert.cert_chain_pems[0].bytes())
    with pytest.raises(ChainError):
        handshake_selftest(key, leaf_only, SNI, [_root(root_ca)], now=NOW, timeout=5)


@pytest.mark.parametrize(
    ("key_value", "chain_value", "message"),
    [
        ("%%%not base64%%%", None, "private key value is not valid base64"),
        (_b64(b"just some text"), None, "private key value does not decode to PEM"),
        (None, "", "certificate chain value does not decode to PEM"),
        (None, _b64(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "PEM"),
    ],
)
def test_unusable_values_fail_without_echoing_them(
    issuing_ca: trustme.CA,
    key_value: str | None,
    chain_value: str | None,
    message: str,
) -> None:
    key, chain, _ = _pair(issuing_ca)
    key = Secret(key_value) if key_value is not None else key
    chain = chain_value if chain_value is not None else chain
    with pytest.raises(CertificateInvalidError, match=message) as caught:
        handshake_selftest(key, chain, SNI, [], now=NOW, timeout=5)
    assert key.reveal() not in str(caught.value)


def test_key_never_written_to_disk(issuing_ca: trustme.CA, tmp_path: Path) -> None:
    # The in-memory loader works from the decoded PEM alone; nothing lands in the
    # working directory or the temp directory.
    cert = issuing_ca.issue_cert(SNI)
    before_tmp = set(Path(os.environ.get("TMPDIR", "/tmp")).iterdir())
    before_cwd = set(Path.cwd().iterdir())
    context = ssl_server_context(
        cert.private_key_pem.bytes(), b"".join(b.bytes() for b in cert.cert_chain_pems)
    )
    assert context.cert_store_stats() is not None
    assert set(Path.cwd().iterdir()) == before_cwd
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).iterdir()) <= before_tmp | {tmp_path}
    assert decode_b64_pem(_b64(b"-----BEGIN X-----"), "x") == b"-----BEGIN X-----"
