"""Operator-given certificate keys (DANE key reuse) and the TLSA 3 1 1 value."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from renewer.config import load_secrets, parse_config
from renewer.errors import ConfigError
from renewer.keys import load_certificate_key, tlsa_3_1_1
from renewer.sensitive import Secret


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def test_a_pem_key_of_the_configured_type_is_accepted_as_pkcs8() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    loaded = load_certificate_key(Secret(_pem(key)), "SMTP_TLS_KEY", "ecdsa-p256")
    assert loaded.reveal().startswith("\x2d----BEGIN PRIVATE KEY-----")
    again = serialization.load_pem_private_key(loaded.reveal().encode(), password=None)
    assert tlsa_3_1_1(again.public_key()) == tlsa_3_1_1(key.public_key())


def test_base64_of_pem_is_accepted_as_fly_secrets_hold_it() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encoded = base64.b64encode(_pem(key).encode()).decode()
    loaded = load_certificate_key(Secret(encoded), "SMTP_TLS_KEY", "rsa-2048")
    assert "PRIVATE KEY" in loaded.reveal()


@pytest.mark.parametrize(
    ("value", "key_type", "says"),
    [
        ("not a key", "ecdsa-p256", "a PEM private key of type ecdsa-p256"),
        ("\x2d----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "ecdsa-p256", "PEM"),
        (None, "rsa-2048", "it holds a ecdsa-p256 key"),  # a real key of the wrong type
    ],
)
def test_a_bad_or_mismatched_key_names_the_variable_and_never_echoes_it(
    value: str | None, key_type: str, says: str
) -> None:
    text = value or _pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError) as caught:
        load_certificate_key(Secret(text), "SMTP_TLS_KEY", key_type)
    assert caught.value.field == "SMTP_TLS_KEY"
    assert says in str(caught.value)
    assert text not in str(caught.value)
    assert caught.value.__cause__ is None


def test_config_key_env_is_loaded_from_the_environment() -> None:
    config = parse_config(
        {
            "dns": {"provider": "rfc2136", "server": "127.0.0.1:53"},
            "certificates": [
                {"name": "mx", "domains": ["mx.example.com"], "key_env": "MX_TLS_KEY"}
            ],
        }
    )
    key_pem = _pem(ec.generate_private_key(ec.SECP256R1()))
    secrets = load_secrets(config, {"MX_TLS_KEY": key_pem})
    assert "mx" in secrets.certificate_keys
    assert secrets.certificate_keys["mx"].reveal() in secrets.all_values()
    # Negative control: the variable missing is a configuration error naming it.
    with pytest.raises(ConfigError) as caught:
        load_secrets(config, {})
    assert caught.value.field == "MX_TLS_KEY"


@pytest.mark.parametrize("name", ["FLY_API_TOKEN", "RENEWER_CONFIG", "1BAD", "with space"])
def test_key_env_must_be_a_variable_of_its_own(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"certificates": [{"name": "a", "domains": ["a.example.com"], "key_env": name}]}
        )
    assert caught.value.field == "certificates[0].key_env"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_tlsa_value_matches_openssl(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.example.com")
    pem = leaf.cert_chain_pems[0].bytes()
    (tmp_path / "leaf.pem").write_bytes(pem)
    pubkey = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "leaf.pem"), "-noout", "-pubkey"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        input=pubkey,
        capture_output=True,
        check=True,
    ).stdout
    digest = (
        subprocess.run(
            ["openssl", "dgst", "-sha256", "-r"], input=der, capture_output=True, check=True
        )
        .stdout.split()[0]
        .decode()
    )
    cert = x509.load_pem_x509_certificate(pem)
    assert tlsa_3_1_1(cert.public_key()) == digest


def test_wrapped_base64_as_plain_base64_prints_it_is_accepted() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encoded = base64.encodebytes(_pem(key).encode()).decode()  # 76-column lines
    assert "\n" in encoded.strip()
    loaded = load_certificate_key(Secret(encoded), "SMTP_TLS_KEY", "ecdsa-p256")
    assert "PRIVATE KEY" in loaded.reveal()
