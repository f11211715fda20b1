"""renewer.certs with real certificates made at test time by trustme and cryptography."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from renewer.certs import (
    ChainError,
    b64_pem,
    covers,
    days_left,
    dns_names,
    fingerprint_sha256,
    issuer_text,
    load_pem_chain,
    load_roots,
    name_matches,
    not_after,
    serial_hex,
    verify_chain,
)
from renewer.errors import CertificateInvalidError, ConfigError

NOW = datetime.now(UTC)


def _leaf_and_rest(leaf: trustme.LeafCert) -> tuple[x509.Certificate, list[x509.Certificate]]:
    chain = load_pem_chain(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return chain[0], chain[1:]


def _root(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def _self_signed(names: list[str], *, eku: bool = True) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "x")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(0x0ABC)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=10, hours=12))
    )
    if names:
        san = x509.SubjectAlternativeName([x509.DNSName(n) for n in names])
        builder = builder.add_extension(san, critical=False)
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def test_formats_match_the_report_contract() -> None:
    cert = _self_signed(["smtp.example.com"])
    fp = fingerprint_sha256(cert)
    assert fp == cert.fingerprint(hashes.SHA256()).hex()
    assert len(fp) == 64 and fp == fp.lower() and ":" not in fp
    assert serial_hex(cert) == "abc"
    assert not_after(cert).tzinfo is not None
    assert not_after(cert).utcoffset() == timedelta(0)
    # 10.5 days left floors to 10; negative control: an hour past expiry is -1.
    assert days_left(cert, NOW) == 10
    assert days_left(cert, not_after(cert) + timedelta(hours=1)) == -1
    assert days_left(cert, not_after(cert) - timedelta(seconds=1)) == 0
    assert fingerprint_sha256(_self_signed(["smtp.example.com"])) != fp


def test_dns_names_and_issuer() -> None:
    ca = trustme.CA(organization_name="Test Org")
    leaf, _ = _leaf_and_rest(ca.issue_cert("a.example.com", "b.example.net", "127.0.0.1"))
    assert dns_names(leaf) == ("a.example.com", "b.example.net")  # IP SANs are not names
    assert "Test Org" in issuer_text(leaf)
    assert dns_names(_self_signed([])) == ()  # CN alone is not a name (RFC 6125)
    assert not covers(_self_signed([]), "x")


@pytest.mark.parametrize(
    ("pattern", "domain", "expected"),
    [
        ("smtp.example.com", "smtp.example.com", True),
        ("SMTP.Example.COM", "smtp.example.com.", True),
        ("smtp.example.com", "mail.example.com", False),
        ("*.example.com", "smtp.example.com", True),
        ("*.example.com", "SMTP.EXAMPLE.COM", True),
        ("*.example.com", "example.com", False),  # the wildcard needs a label
        ("*.example.com", "a.b.example.com", False),  # exactly one label
        ("*.example.com", ".example.com", False),
        ("*.example.com", "*.example.com", True),  # a configured wildcard, same wildcard
        ("smtp.example.com", "*.example.com", False),
        ("*.example.com", "*.b.example.com", False),
        ("s*.example.com", "smtp.example.com", False),  # partial wildcards: not allowed
        ("*.*.example.com", "a.b.example.com", False),
        ("smtp.*.com", "smtp.example.com", False),
        ("*.com", "example.com", False),  # never a whole TLD
        ("*", "localhost", False),
        ("", "", False),
    ],
)
def test_name_matches(pattern: str, domain: str, expected: bool) -> None:
    assert name_matches(pattern, domain) is expected


def test_covers_uses_every_name() -> None:
    cert = _self_signed(["smtp.example.com", "*.example.net"])
    assert covers(cert, "smtp.example.com")
    assert covers(cert, "mx.example.net")
    assert not covers(cert, "example.net")
    assert not covers(cert, "smtp.example.org")


def test_load_pem_chain_and_b64() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("smtp.example.com")
    pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    chain = load_pem_chain(pem.decode())
    assert [c.subject for c in chain] == [
        x509.load_pem_x509_certificate(b.bytes()).subject for b in leaf.cert_chain_pems
    ]
    encoded = b64_pem(pem)
    assert "\n" not in encoded and base64.b64decode(encoded) == pem
    # Same bytes as `base64 -w 0` (DESIGN.md: the original automation's encoding).
    shell = subprocess.run(["base64", "-w", "0"], input=pem, capture_output=True, check=True)
    assert shell.stdout.decode() == encoded
    for bad in ("", "hello", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ChainError):
            load_pem_chain(bad)


def test_verify_chain_accepts_a_good_chain_through_an_intermediate() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf, rest = _leaf_and_rest(intermediate.issue_cert("smtp.example.com", "mx.example.com"))
    assert len(rest) >= 1
    verify_chain(leaf, rest, [_root(root)], now=NOW, use_system_roots=False)
    verify_chain(leaf, rest, [_root(root)], now=NOW, use_system_roots=True, name="mx.example.com")
    # Negative control: without the intermediate the path cannot be built.
    with pytest.raises(ChainError, match=r"smtp\.example\.com"):
        verify_chain(leaf, [], [_root(root)], now=NOW, use_system_roots=False)


def test_verify_chain_rejects_wrong_ca() -> None:
    leaf, rest = _leaf_and_rest(trustme.CA().issue_cert("smtp.example.com"))
    other = trustme.CA()
    with pytest.raises(ChainError) as caught:
        verify_chain(leaf, rest, [_root(other)], now=NOW, use_system_roots=True)
    assert isinstance(caught.value, CertificateInvalidError)  # validate's error type
    assert caught.value.reason.startswith("chain does not verify for smtp.example.com: ")
    assert "<Certificate" not in caught.value.reason
    assert "no path to a trusted root from the issuer" in caught.value.reason


def test_verify_chain_rejects_wrong_name_and_expiry() -> None:
    ca = trustme.CA()
    leaf, rest = _leaf_and_rest(
        ca.issue_cert(
            "smtp.example.com",
            not_before=NOW - timedelta(days=1),
            not_after=NOW + timedelta(days=2),
        )
    )
    roots = [_root(ca)]
    verify_chain(leaf, rest, roots, now=NOW, use_system_roots=False)
    with pytest.raises(ChainError, match=r"mail\.example\.com"):
        verify_chain(leaf, rest, roots, now=NOW, use_system_roots=False, name="mail.example.com")
    with pytest.raises(ChainError):
        verify_chain(leaf, rest, roots, now=NOW + timedelta(days=3), use_system_roots=False)
    with pytest.raises(ChainError):  # not yet valid
        verify_chain(leaf, rest, roots, now=NOW - timedelta(days=30), use_system_roots=False)


def _signed_by(ca: trustme.CA, usages: list[x509.ObjectIdentifier]) -> x509.Certificate:
    ca_cert = _root(ca)
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("smtp.example.com")]), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def test_verify_chain_requires_server_auth() -> None:
    ca = trustme.CA()
    good = _signed_by(ca, [ExtendedKeyUsageOID.SERVER_AUTH])
    verify_chain(good, [], [_root(ca)], now=NOW, use_system_roots=False)
    client_only = _signed_by(ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(ChainError, match="serverAuth"):
        verify_chain(client_only, [], [_root(ca)], now=NOW, use_system_roots=False)


def test_verify_chain_wildcard_and_self_signed() -> None:
    ca = trustme.CA()
    leaf, rest = _leaf_and_rest(ca.issue_cert("*.example.com"))
    verify_chain(leaf, rest, [_root(ca)], now=NOW, use_system_roots=False)
    with pytest.raises(ChainError):
        verify_chain(leaf, rest, [_root(ca)], now=NOW, use_system_roots=False, name="example.com")
    selfie = _self_signed(["smtp.example.com"])
    with pytest.raises(ChainError):
        verify_chain(selfie, [], [], now=NOW, use_system_roots=True)
    with pytest.raises(ChainError, match="no trusted roots"):
        verify_chain(selfie, [], [], now=NOW, use_system_roots=False)


def test_load_roots(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    assert load_roots(None) == []
    assert load_roots(bundle) == [_root(ca)]
    with pytest.raises(ConfigError, match=r"acme\.ca_bundle"):
        load_roots(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"acme\.ca_bundle"):
        load_roots(junk)


def test_key_serialisation_is_not_needed_for_cert_helpers() -> None:
    # Negative control for load_pem_chain: a private key PEM is not a certificate.
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ChainError):
        load_pem_chain(pem)
