"""BindServer: a real named on a loopback port, answering for its zones, stopped on exit."""

from __future__ import annotations

import base64
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from emulators.bind import BindError, BindServer, generate_tsig_secret

pytestmark = pytest.mark.integration


def _soa(address: tuple[str, int], name: str, timeout: float = 2) -> dns.message.Message:
    query = dns.message.make_query(name, dns.rdatatype.SOA)
    return dns.query.udp(query, address[0], port=address[1], timeout=timeout)


def test_serves_each_zone_authoritatively_and_stops(tmp_path: Path) -> None:
    server = BindServer(
        tmp_path,
        ["example.com", "Example.NET."],
        tsig_name="k",
        tsig_secret_b64=generate_tsig_secret(),
    )
    with server:
        host, port = server.address
        assert host == "127.0.0.1"
        assert port > 0
        for zone in ("example.com", "example.net"):
            resp = _soa(server.address, zone)
            assert resp.rcode() == dns.rcode.NOERROR
            assert resp.flags & dns.flags.AA
            assert resp.answer[0].name.to_text() == f"{zone}."
        # NS glue points at loopback, so a poller following NS records finds this host.
        ns = dns.query.udp(
            dns.message.make_query("ns1.example.com", dns.rdatatype.A), host, port=port, timeout=2
        )
        assert [r.address for r in ns.answer[0]] == ["127.0.0.1"]
        # Negative control: a zone it does not serve is refused, and it does not recurse.
        assert _soa(server.address, "example.org").rcode() == dns.rcode.REFUSED
        assert (tmp_path / "named.conf").stat().st_mode & 0o077 == 0
    with pytest.raises(dns.exception.Timeout):
        _soa((host, port), "example.com", timeout=0.3)


def test_generated_secret_is_256_bits_and_fresh() -> None:
    a, b = generate_tsig_secret(), generate_tsig_secret()
    assert len(base64.b64decode(a)) == 32
    assert a != b


def test_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BindError, match="base64"):
        BindServer(tmp_path, ["example.com"], tsig_name="k", tsig_secret_b64="not base64!")
    with pytest.raises(BindError, match="valid DNS name"):
        BindServer(
            tmp_path, ['ex"ample.com'], tsig_name="k", tsig_secret_b64=generate_tsig_secret()
        )
    with pytest.raises(BindError, match="algorithm"):
        BindServer(
            tmp_path,
            ["example.com"],
            tsig_name="k",
            tsig_secret_b64=generate_tsig_secret(),
            tsig_algorithm="rot13",
        )
