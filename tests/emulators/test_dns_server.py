"""DnsServer: authoritative answers from a RecordStore over real UDP and TCP sockets."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from emulators.dns_server import DnsServer, RecordStore

pytestmark = pytest.mark.integration


def _ask(
    address: tuple[str, int], name: str, rtype: str, *, tcp: bool = False
) -> dns.message.Message:
    query = dns.message.make_query(name, rtype)
    if tcp:
        return dns.query.tcp(query, address[0], port=address[1], timeout=2)
    return dns.query.udp(query, address[0], port=address[1], timeout=2)


def _txt(resp: dns.message.Message) -> list[str]:
    return sorted(
        b"".join(r.strings).decode()
        for rrset in resp.answer
        if rrset.rdtype == dns.rdatatype.TXT
        for r in rrset
    )


def test_record_store_add_remove_values_names() -> None:
    store = RecordStore()
    store.add("_ACME-challenge.Example.com.", "txt", "v1")
    store.add("_acme-challenge.example.com", "TXT", "v2")
    store.add("_acme-challenge.example.com", "TXT", "v2")
    assert store.values("_acme-challenge.example.com", "TXT") == ["v1", "v2", "v2"]
    assert store.names() == ["_acme-challenge.example.com"]
    serial = store.serial
    assert store.remove("_acme-challenge.example.com.", "TXT", "v2") is True
    assert store.serial > serial
    assert store.values("_acme-challenge.example.com", "TXT") == ["v1", "v2"]
    assert store.remove("_acme-challenge.example.com", "TXT", "absent") is False
    store.remove("_acme-challenge.example.com", "TXT", "v1")
    store.remove("_acme-challenge.example.com", "TXT", "v2")
    assert store.names() == []
    assert store.values("_acme-challenge.example.com", "TXT") == []


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_txt_answer_is_authoritative_and_follows_the_store(tcp: bool) -> None:
    store = RecordStore()
    with DnsServer(store, ["example.com"]) as server:
        host, port = server.address
        assert host == "127.0.0.1"
        assert port > 0
        name = "_acme-challenge.smtp.example.com"
        store.add(name, "TXT", "token-one")
        store.add(name, "TXT", "token-two")
        resp = _ask(server.address, name + ".", "TXT", tcp=tcp)
        assert resp.rcode() == dns.rcode.NOERROR
        assert resp.flags & dns.flags.AA
        assert _txt(resp) == ["token-one", "token-two"]
        store.remove(name, "TXT", "token-one")
        assert _txt(_ask(server.address, name, "TXT", tcp=tcp)) == ["token-two"]
        # the query log shows which transport was used
        assert (name, "TXT", "tcp" if tcp else "udp") in server.queries()


def test_nodata_nxdomain_empty_non_terminal_and_refused() -> None:
    store = RecordStore()
    store.add("_acme-challenge.smtp.example.com", "TXT", "x")
    store.add("host.example.com", "A", "192.0.2.7")
    with DnsServer(store, ["example.com"]) as server:
        # a name with an A record but no TXT: NODATA, SOA in authority
        nodata = _ask(server.address, "host.example.com", "TXT")
        assert nodata.rcode() == dns.rcode.NOERROR
        assert nodata.answer == []
        assert nodata.authority[0].rdtype == dns.rdatatype.SOA
        a = _ask(server.address, "host.example.com", "A")
        assert [r.address for r in a.answer[0]] == ["192.0.2.7"]
        # nothing there at all: NXDOMAIN (still authoritative)
        nx = _ask(server.address, "missing.example.com", "TXT")
        assert nx.rcode() == dns.rcode.NXDOMAIN
        assert nx.flags & dns.flags.AA
        # smtp.example.com exists only as a parent of a record: NODATA, not NXDOMAIN
        ent = _ask(server.address, "smtp.example.com", "TXT")
        assert ent.rcode() == dns.rcode.NOERROR
        assert ent.answer == []
        # outside the zones
        refused = _ask(server.address, "example.org", "TXT")
        assert refused.rcode() == dns.rcode.REFUSED
        assert not refused.flags & dns.flags.AA
        # a record removed: the name turns into NXDOMAIN again
        store.remove("_acme-challenge.smtp.example.com", "TXT", "x")
        gone = _ask(server.address, "_acme-challenge.smtp.example.com", "TXT")
        assert gone.rcode() == dns.rcode.NXDOMAIN


def test_apex_soa_ns_and_nameserver_address() -> None:
    store = RecordStore()
    with DnsServer(store, ["Example.NET.", "sub.example.com"]) as server:
        soa = _ask(server.address, "example.net", "SOA", tcp=True)
        assert soa.rcode() == dns.rcode.NOERROR
        assert soa.answer[0][0].mname.to_text() == "ns1.example.net."
        ns = _ask(server.address, "sub.example.com", "NS")
        assert [r.target.to_text() for r in ns.answer[0]] == ["ns1.sub.example.com."]
        addr = _ask(server.address, "ns1.sub.example.com", "A")
        assert [r.address for r in addr.answer[0]] == ["127.0.0.1"]
        # the parent of a served zone is not ours
        assert _ask(server.address, "example.com", "SOA").rcode() == dns.rcode.REFUSED
        # the serial moves when the store changes (secondaries and caches can tell)
        before = soa.answer[0][0].serial
        store.add("x.example.net", "TXT", "y")
        after = _ask(server.address, "example.net", "SOA").answer[0][0].serial
        assert after > before


def test_long_txt_value_is_split_and_large_udp_answer_truncates() -> None:
    store = RecordStore()
    long_value = "a" * 600
    with DnsServer(store, ["example.com"]) as server:
        store.add("long.example.com", "TXT", long_value)
        assert _txt(_ask(server.address, "long.example.com", "TXT", tcp=True)) == [long_value]
        for i in range(20):
            store.add("many.example.com", "TXT", f"{i:02d}" + "b" * 60)
        query = dns.message.make_query("many.example.com", "TXT", use_edns=False)
        udp = dns.query.udp(query, server.address[0], port=server.address[1], timeout=2)
        assert udp.flags & dns.flags.TC
        tcp = dns.query.tcp(query, server.address[0], port=server.address[1], timeout=2)
        assert len(_txt(tcp)) == 20


def test_garbage_gets_formerr_and_server_keeps_serving() -> None:
    with DnsServer(RecordStore(), ["example.com"]) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.sendto(b"\x12\x34" + b"\x01\x00" + b"\xff" * 14, server.address)
            reply, _ = sock.recvfrom(512)
        assert reply[:2] == b"\x12\x34"
        assert reply[3] & 0x0F == dns.rcode.FORMERR
        assert _ask(server.address, "example.com", "SOA").rcode() == dns.rcode.NOERROR


def test_stopped_server_no_longer_answers() -> None:
    server = DnsServer(RecordStore(), ["example.com"])
    with server:
        address = server.address
    with pytest.raises(RuntimeError):
        _ = server.address
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        assert sock.connect_ex(address) != 0
