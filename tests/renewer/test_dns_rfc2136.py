"""Rfc2136Dns against a real BIND 9 with a TSIG key."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rdatatype
import pytest

from emulators.bind import BindServer, generate_tsig_secret
from renewer.dns_provider import TxtRecord
from renewer.dns_rfc2136 import Rfc2136Dns
from renewer.errors import DnsChallengeError
from renewer.sensitive import Secret

pytestmark = pytest.mark.integration

KEY = "renewer-key"
NAME = "_acme-challenge.smtp.example.com"


@pytest.fixture(scope="module")
def tsig_secret() -> str:
    return generate_tsig_secret()


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory, tsig_secret: str) -> Iterator[BindServer]:
    workdir = tmp_path_factory.mktemp("bind")
    with BindServer(
        workdir, ["example.com", "sub.example.net"], tsig_name=KEY, tsig_secret_b64=tsig_secret
    ) as server:
        yield server


def _served(bind: BindServer, name: str) -> list[str]:
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    resp = dns.query.tcp(query, bind.host, port=bind.port, timeout=2)
    return [b"".join(r.strings).decode() for rrset in resp.answer for r in rrset]


def _provider(bind: BindServer, secret: str, name: str | None = KEY) -> Rfc2136Dns:
    return Rfc2136Dns(bind.address, name, "hmac-sha256", Secret(secret), timeout=2)


def test_create_list_delete_round_trip(bind: BindServer, tsig_secret: str) -> None:
    dns_ = _provider(bind, tsig_secret)
    assert _served(bind, NAME) == []
    first = dns_.create_txt("_ACME-challenge.smtp.example.com.", "value-one")
    second = dns_.create_txt(NAME, "value-two")
    assert first == TxtRecord(NAME, "value-one", "example.com", None)
    assert sorted(_served(bind, NAME)) == ["value-one", "value-two"]
    assert sorted(r.value for r in dns_.list_stale_txt(NAME)) == ["value-one", "value-two"]

    dns_.delete_txt(first)
    assert _served(bind, NAME) == ["value-two"]  # only the one asked for went away
    dns_.delete_txt(first)  # idempotent
    dns_.delete_txt(second)
    assert _served(bind, NAME) == []
    assert dns_.list_stale_txt(NAME) == []


def test_zone_is_found_by_soa_walk(bind: BindServer, tsig_secret: str) -> None:
    dns_ = _provider(bind, tsig_secret)
    assert dns_.find_zone("_acme-challenge.a.b.example.com") == "example.com"
    assert dns_.find_zone("_acme-challenge.mail.sub.example.net") == "sub.example.net"
    record = dns_.create_txt("_acme-challenge.mail.sub.example.net", "v")
    assert record.zone == "sub.example.net"
    assert _served(bind, record.fqdn) == ["v"]
    dns_.delete_txt(record)
    # Negative control: no zone on this server holds the name.
    with pytest.raises(DnsChallengeError, match=r"not authoritative .*example\.org"):
        dns_.create_txt("_acme-challenge.smtp.example.org", "v")
    with pytest.raises(DnsChallengeError, match="not authoritative"):
        dns_.create_txt("_acme-challenge.example.net", "v")  # parent of the zone


def test_wrong_tsig_secret_is_a_clear_error(bind: BindServer, tsig_secret: str) -> None:
    wrong = generate_tsig_secret()
    with pytest.raises(DnsChallengeError) as info:
        _provider(bind, wrong).create_txt(NAME, "forged")
    message = str(info.value)
    assert f"{bind.host}:{bind.port}" in message
    assert "TSIG" in message
    assert wrong not in message
    assert tsig_secret not in message
    assert _served(bind, NAME) == []  # nothing was written


def test_unknown_key_and_unsigned_updates_are_refused(bind: BindServer, tsig_secret: str) -> None:
    with pytest.raises(DnsChallengeError, match="TSIG"):
        _provider(bind, tsig_secret, name="other-key").create_txt(NAME, "x")
    unsigned = Rfc2136Dns(bind.address, None, "hmac-sha256", None, timeout=2)
    with pytest.raises(DnsChallengeError, match=r"REFUSED.*TSIG"):
        unsigned.create_txt(NAME, "x")
    assert _served(bind, NAME) == []


def test_unreachable_server_names_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        dns_ = Rfc2136Dns(("127.0.0.1", port), KEY, "hmac-sha256", Secret(generate_tsig_secret()))
        with pytest.raises(DnsChallengeError, match=f"127.0.0.1:{port}"):
            dns_.create_txt(NAME, "x")


def test_silent_server_times_out() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # accepts the connection, never answers
        port = sock.getsockname()[1]
        dns_ = Rfc2136Dns(
            ("127.0.0.1", port), KEY, "hmac-sha256", Secret(generate_tsig_secret()), timeout=0.3
        )
        with pytest.raises(DnsChallengeError, match=r"did not answer within 0\.3 s"):
            dns_.create_txt(NAME, "x")
