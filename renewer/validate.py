"""Proves an issued certificate is good before anything leaves the process.

Key matches the certificate; names cover every configured domain; the chain verifies to
a trusted root; it is valid now and has serverAuth; and a real STARTTLS handshake
succeeds against a local SMTP server loaded from exactly the base64 values to deploy.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from renewer.certs import (
    ChainError,
    covers,
    fingerprint_sha256,
    not_after,
    serial_hex,
    system_roots,
    verify_chain,
)
from renewer.errors import CertificateInvalidError
from renewer.issue import IssuedCertificate
from renewer.selftest import handshake_selftest
from renewer.sensitive import Secret
from renewer.targets import DeployMaterial


@dataclass(frozen=True)
class ValidatedCertificate:
    name: str
    leaf: x509.Certificate
    material: DeployMaterial
    not_after: datetime

    @property
    def fingerprint(self) -> str:
        return self.material.fingerprint_sha256

    @property
    def serial(self) -> str:
        return self.material.serial


def _public_bytes(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def validate_certificate(
    issued: IssuedCertificate,
    domains: Sequence[str],
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
    use_system_roots: bool,
    handshake_timeout: float = 10.0,
) -> ValidatedCertificate:
    """Raises ``CertificateInvalidError`` naming the first check that fails."""
    leaf = issued.leaf
    try:
        key = serialization.load_pem_private_key(issued.key_pem.reveal().encode(), password=None)
    except (ValueError, TypeError):
        raise CertificateInvalidError("the private key cannot be read") from None
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise CertificateInvalidError("the private key does not match the certificate")
    missing = [d for d in domains if not covers(leaf, d)]
    if missing:
        raise CertificateInvalidError(f"the certificate does not cover {', '.join(missing)}")
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise CertificateInvalidError(
            f"the certificate is not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
            f"to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
        )
    try:
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise CertificateInvalidError("the certificate lacks the serverAuth extended key usage")
    # The system bundles are read once here for both verifications below (issue 6).
    trusted = [*roots, *system_roots()] if use_system_roots else list(roots)
    try:
        verify_chain(leaf, issued.chain, trusted, now=now, use_system_roots=False, name=domains[0])
    except ChainError as exc:
        raise CertificateInvalidError(f"the chain does not verify: {exc}") from None

    # Encode exactly once: what the self-test loads is byte for byte what gets deployed.
    key_b64 = Secret(base64.b64encode(issued.key_pem.reveal().encode()).decode("ascii"))
    chain_b64 = base64.b64encode(issued.fullchain_pem.encode()).decode("ascii")
    seen = handshake_selftest(
        key_b64,
        chain_b64,
        domains[0],
        trusted,
        now=now,
        timeout=handshake_timeout,
        use_system_roots=False,
    )
    fingerprint = fingerprint_sha256(leaf)
    if seen != fingerprint:
        raise CertificateInvalidError(
            f"the local STARTTLS server served {seen[:16]}..., not the issued {fingerprint[:16]}..."
        )
    material = DeployMaterial(
        certificate_name=issued.name,
        key_b64=key_b64,
        chain_b64=chain_b64,
        serial=serial_hex(leaf),
        fingerprint_sha256=fingerprint,
    )
    return ValidatedCertificate(issued.name, leaf, material, not_after(leaf))
