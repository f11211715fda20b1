"""renewer.probe: endpoint syntax, and what real SMTP servers on loopback present."""

from __future__ import annotations

import pytest

from renewer.errors import ConfigError
from renewer.probe import Endpoint


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
