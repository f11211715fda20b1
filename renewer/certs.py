"""Pure X.509 helpers shared by decide, validate, verify and the report.

Formats follow DESIGN.md ("Precise meanings"): fingerprints are lowercase hex SHA-256
without separators, serials lowercase hex, dates aware UTC, ``days_left`` a floor.
Encoded values are ``base64 -w 0`` of the PEM file, as the original automation did.
"""

from __future__ import annotations

import base64
import math
import re
import ssl
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from renewer.errors import CertificateInvalidError, ConfigError

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)
_ENCOUNTERED = re.compile(r"\s*\(encountered processing <Certificate\(.*\)>\)$", re.DOTALL)
# Stands in for the "*" of a wildcard name when one is checked as a server name.
_WILDCARD_PROBE_LABEL = "wildcard-check"


class ChainError(CertificateInvalidError):
    """A certificate chain does not verify (or cannot be read); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


def days_left(cert: x509.Certificate, now: datetime) -> int:
    """Whole days until expiry, rounded down (negative once expired)."""
    return math.floor((not_after(cert) - now).total_seconds() / 86400)


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The subjectAltName DNS names; the subject CN is ignored (RFC 6125 6.4.4)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(san.value.get_values_for_type(x509.DNSName))


def _normal(name: str) -> str:
    return name.strip().lower().removesuffix(".")


def name_matches(pattern: str, domain: str) -> bool:
    """RFC 6125 6.4.3 as the CA/B Forum allows it: a ``*`` only as the whole left-most
    label, matching exactly one non-empty label, never a bare registrable suffix.
    A configured wildcard domain is covered only by the same wildcard."""
    pattern, domain = _normal(pattern), _normal(domain)
    if not pattern or not domain:
        return False
    if pattern == domain:
        return True
    if not pattern.startswith("*.") or "*" in pattern[2:]:
        return False
    base = pattern[2:]
    if base.count(".") < 1:  # "*.com" would cover a whole TLD
        return False
    label, dot, rest = domain.partition(".")
    return bool(dot) and bool(label) and label != "*" and rest == base


def covers(cert: x509.Certificate, domain: str) -> bool:
    return any(name_matches(name, domain) for name in dns_names(cert))


def issuer_text(cert: x509.Certificate) -> str:
    return cert.issuer.rfc4514_string()


def load_pem_chain(pem: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM text, in order; ``ChainError`` when there is none."""
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ChainError(f"not a PEM certificate chain: {exc}") from exc
    if not certs:
        raise ChainError("no certificate in the PEM text")
    return certs


def b64_pem(pem: str | bytes) -> str:
    """``base64 -w 0`` of a PEM file: the deployed form (DESIGN.md, "Secrets")."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    return base64.b64encode(data).decode("ascii")


def _server_name(name: str) -> str:
    # A wildcard is not a name a client connects to; check a name it must cover instead.
    return f"{_WILDCARD_PROBE_LABEL}.{name[2:]}" if name.startswith("*.") else name


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
    use_system_roots: bool,
    name: str | None = None,
) -> None:
    """Verify ``leaf`` (through ``intermediates``) to ``roots`` (plus the system and
    certifi roots when asked) as a TLS server certificate for ``name`` at ``now``.

    ``name`` defaults to the leaf's first DNS name (DESIGN.md: SNI is the certificate's
    first domain). Raises ``ChainError`` with the verifier's reason.
    """
    trusted = list(roots) + (system_roots() if use_system_roots else [])
    if not trusted:
        raise ChainError("no trusted roots to verify against")
    if name is None:
        names = dns_names(leaf)
        if not names:
            raise ChainError("the certificate has no DNS names")
        name = names[0]
    # The Web PKI defaults, except for the criticality of subjectAltName and
    # extendedKeyUsage, which test CAs (trustme) mark critical and mail clients ignore;
    # the name is still matched against the SAN and serverAuth is still required.
    ee_policy = (
        ExtensionPolicy.webpki_defaults_ee()
        .require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _require_server_auth)
    )
    try:
        server_name = x509.DNSName(_server_name(_normal(name)))
        verifier = (
            PolicyBuilder()
            .store(Store(trusted))
            .time(now)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
            .build_server_verifier(server_name)
        )
        verifier.verify(leaf, list(intermediates))
    except VerificationError as exc:
        # Drop the verifier's "(encountered processing <Certificate(...)>)": a repr, not news.
        reason = _ENCOUNTERED.sub("", str(exc))
        if "candidates exhausted" in reason:  # the verifier's words for "no path found"
            reason = f"no path to a trusted root from the issuer {issuer_text(leaf)!r}"
        raise ChainError(f"chain does not verify for {name}: {reason}") from exc
    except ValueError as exc:  # a name or certificate the verifier cannot even consider
        raise ChainError(f"chain cannot be verified for {name}: {exc}") from exc


def _require_server_auth(
    _policy: object, _cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None
) -> None:
    if usage is not None and ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise ValueError("extendedKeyUsage lacks serverAuth")


def _certs_in_file(path: Path) -> list[x509.Certificate]:
    """Each parseable certificate of a bundle; one odd system root must not lose the rest."""
    data = path.read_bytes()
    found: list[x509.Certificate] = []
    with warnings.catch_warnings():  # old roots with odd serials still verify others
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            # The whole bundle in one call, 4x faster than block by block (issue 6).
            return x509.load_pem_x509_certificates(data)
        except ValueError:
            pass  # an unreadable block: keep every one that parses, below
        for block in _PEM_CERT.findall(data):
            try:
                found.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    return found


def system_roots() -> list[x509.Certificate]:
    """certifi's roots plus the operating system's bundle, when one exists."""
    roots = _certs_in_file(Path(certifi.where()))
    cafile = ssl.get_default_verify_paths().cafile
    if cafile and Path(cafile).is_file():
        seen = set(roots)  # certificates hash and compare by their DER bytes
        roots += [c for c in _certs_in_file(Path(cafile)) if c not in seen]
    return roots


def load_roots(ca_bundle: Path | None) -> list[x509.Certificate]:
    """The extra roots of ``acme.ca_bundle`` (a private or test CA); none without one."""
    if ca_bundle is None:
        return []
    try:
        data = ca_bundle.read_bytes()
    except OSError as exc:
        raise ConfigError("acme.ca_bundle", f"a readable PEM file ({exc.strerror})") from exc
    try:
        return load_pem_chain(data)
    except ChainError as exc:
        raise ConfigError("acme.ca_bundle", f"a PEM file of certificates ({exc})") from exc
