"""Certificate private keys given by the operator, for key reuse across renewals.

Mail servers published with DANE (TLSA ``3 1 1``) pin the public key: a renewal that
rotates the key breaks delivery from validating senders until the TLSA record changes
(peers.md, pain point 4). With ``certificates[].key_env`` every renewal reuses the key
held in that environment variable, so the TLSA record keeps matching.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from renewer.errors import ConfigError
from renewer.sensitive import Secret

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def key_type_of(key: PrivateKey) -> str:
    """The config's name for a key: ``ecdsa-p256`` or ``rsa-<bits>`` (others: ``other``)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ecdsa-p256" if isinstance(key.curve, ec.SECP256R1) else f"ecdsa-{key.curve.name}"
    return f"rsa-{key.key_size}"


def load_private_key(value: Secret, field: str, expected: str) -> PrivateKey:
    """An EC or RSA key from PEM text, or base64 of PEM (as Fly secrets hold it).
    Raises ConfigError(field, expected); never echoes the value."""
    raw = value.reveal().strip().encode()
    if not raw.startswith(b"-----BEGIN"):
        try:
            # ``base64`` without -w 0 wraps lines: fold them before a strict decode.
            raw = base64.b64decode(b"".join(raw.split()), validate=True).strip()
        except (binascii.Error, ValueError):
            raise ConfigError(field, expected) from None
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        # No ``from exc``: the parser's message may quote key material.
        raise ConfigError(field, expected) from None
    if not isinstance(key, PrivateKey):
        raise ConfigError(field, f"{expected}; it holds a {type(key).__name__}")
    return key


def load_certificate_key(value: Secret, field: str, key_type: str) -> Secret:
    """Checks an operator-given certificate key and returns it as PKCS#8 PEM."""
    expected = f"a PEM private key of type {key_type} (or base64 of one)"
    key = load_private_key(value, field, expected)
    if key_type_of(key) != key_type:
        raise ConfigError(field, f"{expected}; it holds a {key_type_of(key)} key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Secret(pem.decode())


def tlsa_3_1_1(public_key: PublicKeyTypes) -> str:
    """The DANE TLSA ``3 1 1`` association data: SHA-256 of the SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()
