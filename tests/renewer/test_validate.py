"""renewer.validate: nothing is deployed unless the issued certificate passes every check
(DESIGN.md "validate"), including a real STARTTLS handshake against the exact values."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from renewer.certs import fingerprint_sha256, load_pem_chain, serial_hex
from renewer.errors import CertificateInvalidError
from renewer.issue import IssuedCertificate
from renewer.sensitive import Secret
from renewer.validate import validate_certificate

NOW = datetime.now(UTC).replace(microsecond=0)
DOMAINS = ("smtp.example.com", "mx.example.com")


@pytest.fixture(scope="module")
def root_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def issuing_ca(root_ca: trustme.CA) -> trustme.CA:
    return root_ca.create_child_ca()


@pytest.fixture(scope="module")
def roots(root_ca: trustme.CA) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(root_ca.cert_pem.bytes())]


@pytest.fixture(autouse=True)
def _in_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def _issued(
    ca: trustme.CA,
    *names: str,
    key_from: trustme.LeafCert | None = None,
    valid_from: timedelta = timedelta(days=-1),
    valid_for: timedelta = timedelta(days=90),
) -> IssuedCertificate:
    leaf = ca.issue_cert(
        *(names or DOMAINS), not_before=NOW + valid_from, not_after=NOW + valid_for
    )
    fullchain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems).decode()
    certs = load_pem_chain(fullchain)
    key = (key_from or leaf).private_key_pem.bytes().decode()
    return IssuedCertificate(
        name="smtp",
        key_pem=Secret(key),
        fullchain_pem=fullchain,
        leaf=certs[0],
        chain=tuple(certs[1:]),
        timings={},
    )


class _OwnCA:
    """A minimal Web-PKI-shaped CA, for leaves whose extensions trustme does not let us set."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "validate test root")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=10))
            .not_valid_after(NOW + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, usages: list[x509.ObjectIdentifier]) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAINS[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=90))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in DOMAINS]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return IssuedCertificate(
            name="smtp",
            key_pem=Secret(key_pem),
            fullchain_pem=leaf.public_bytes(serialization.Encoding.PEM).decode(),
            leaf=leaf,
            chain=(),
            timings={},
        )


def _validate(issued: IssuedCertificate, roots: list[x509.Certificate]) -> object:
    return validate_certificate(
        issued, DOMAINS, roots, now=NOW, use_system_roots=False, handshake_timeout=5
    )


def _assert_nothing_written(tmp_path: Path) -> None:
    assert os.listdir(tmp_path) == []


@pytest.mark.integration
def test_good_certificate_passes_with_the_starttls_selftest(
    issuing_ca: trustme.CA, roots: list[x509.Certificate], tmp_path: Path
) -> None:
    issued = _issued(issuing_ca)
    validated = validate_certificate(
        issued, DOMAINS, roots, now=NOW, use_system_roots=False, handshake_timeout=5
    )
    assert validated.name == "smtp"
    assert validated.leaf == issued.leaf
    assert validated.fingerprint == fingerprint_sha256(issued.leaf)
    assert validated.serial == serial_hex(issued.leaf)
    assert validated.not_after == issued.leaf.not_valid_after_utc
    # The deployed values are `base64 -w 0` of exactly the PEMs (DESIGN.md, "Secrets").
    material = validated.material
    assert base64.b64decode(material.key_b64.reveal()).decode() == issued.key_pem.reveal()
    assert base64.b64decode(material.chain_b64).decode() == issued.fullchain_pem
    assert "\n" not in material.chain_b64
    assert issued.key_pem.reveal() not in repr(validated)
    assert material.key_b64.reveal() not in repr(validated)
    _assert_nothing_written(tmp_path)


def test_key_mismatch(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    other = issuing_ca.issue_cert(*DOMAINS)
    issued = _issued(issuing_ca, key_from=other)
    with pytest.raises(CertificateInvalidError, match="private key does not match") as caught:
        _validate(issued, roots)
    assert caught.value.step == "validate"
    assert issued.key_pem.reveal() not in str(caught.value)


def test_unreadable_key(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    good = _issued(issuing_ca)
    broken = IssuedCertificate(
        "smtp",
        Secret("\x2d----BEGIN PRIVATE KEY-----\nAAAA\n"),
        good.fullchain_pem,
        good.leaf,
        good.chain,
        {},
    )
    with pytest.raises(CertificateInvalidError, match="private key cannot be read"):
        _validate(broken, roots)


def test_missing_name(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    issued = _issued(issuing_ca, "smtp.example.com")
    with pytest.raises(CertificateInvalidError, match=r"does not cover mx\.example\.com"):
        _validate(issued, roots)


@pytest.mark.parametrize(
    ("valid_from", "valid_for"),
    [
        pytest.param(timedelta(days=-90), timedelta(seconds=-1), id="expired"),
        pytest.param(timedelta(hours=1), timedelta(days=90), id="not-yet-valid"),
    ],
)
def test_not_valid_now(
    issuing_ca: trustme.CA,
    roots: list[x509.Certificate],
    valid_from: timedelta,
    valid_for: timedelta,
) -> None:
    issued = _issued(issuing_ca, valid_from=valid_from, valid_for=valid_for)
    with pytest.raises(CertificateInvalidError, match="not valid now"):
        _validate(issued, roots)


@pytest.mark.integration
def test_missing_server_auth(tmp_path: Path) -> None:
    ca = _OwnCA()
    client_only = ca.issue([ExtendedKeyUsageOID.CLIENT_AUTH])
    with pytest.raises(CertificateInvalidError, match="serverAuth"):
        _validate(client_only, [ca.cert])
    # Negative control: the same CA and shape with serverAuth passes every check.
    server = ca.issue([ExtendedKeyUsageOID.SERVER_AUTH])
    assert _validate(server, [ca.cert]) is not None
    _assert_nothing_written(tmp_path)


def test_chain_to_an_untrusted_ca(roots: list[x509.Certificate]) -> None:
    stranger = trustme.CA().create_child_ca()
    issued = _issued(stranger)
    with pytest.raises(CertificateInvalidError, match="chain does not verify") as caught:
        _validate(issued, roots)
    assert "no path to a trusted root" in str(caught.value)


def test_chain_missing_its_intermediate(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    good = _issued(issuing_ca)
    leaf_only = IssuedCertificate("smtp", good.key_pem, good.fullchain_pem, good.leaf, (), {})
    with pytest.raises(CertificateInvalidError, match="chain does not verify"):
        _validate(leaf_only, roots)
