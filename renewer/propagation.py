"""Wait until a DNS-01 TXT record is served by every authoritative nameserver.

Polling, never a fixed sleep (peers.md 4.1: fixed sleeps make DNS-01 flaky): the first
check is immediate, then the pause grows from 20 ms to at most 0.5 s, so a record is seen
well under a second after the servers start serving it. Each nameserver is asked directly
(UDP, TCP when the reply is truncated); the system resolver is used only to find them.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from renewer.dns_provider import normalize_name
from renewer.errors import DnsChallengeError

log = logging.getLogger(__name__)

FIRST_DELAY = 0.02  # seconds
MAX_DELAY = 0.5
GROWTH = 1.5
QUERY_TIMEOUT = 1.0  # per query; a slow server is asked again on the next round


@dataclass
class _Nameserver:
    label: str  # what the error message shows: "ns1.example.com (192.0.2.1:53)"
    addresses: list[tuple[str, int]]
    seen: bool = False
    last: str = "not asked yet"


def wait_for_txt(
    fqdn: str,
    value: str,
    *,
    nameservers: Sequence[tuple[str, int]] | None,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    resolver: dns.resolver.Resolver | None = None,
    ns_port: int = 53,
) -> float:
    """Return the seconds waited until every nameserver serves TXT ``value`` at ``fqdn``.

    ``nameservers`` (host, port) are asked when given; otherwise the zone's NS records
    are found through ``resolver`` (the system's by default) and their addresses asked on
    ``ns_port``. Raises DnsChallengeError naming the servers that never served it.
    """
    fqdn = normalize_name(fqdn)
    start = clock()
    deadline = start + timeout
    servers = (
        [_configured(host, port) for host, port in nameservers]
        if nameservers
        else _authoritative(fqdn, resolver or dns.resolver.Resolver(), ns_port)
    )
    log.info(
        "Waiting for TXT %s on %d nameserver(s): %s",
        fqdn,
        len(servers),
        ", ".join(s.label for s in servers),
    )
    delay = FIRST_DELAY
    while True:
        for server in servers:
            if not server.seen:
                remaining = max(deadline - clock(), 0.05)
                server.seen = _serves(server, fqdn, value, min(QUERY_TIMEOUT, remaining))
        waited = clock() - start
        if all(s.seen for s in servers):
            log.info("TXT %s is visible on every nameserver after %.2f s", fqdn, waited)
            return waited
        if clock() >= deadline:
            missing = [s for s in servers if not s.seen]
            details = "; ".join(f"{s.label}: {s.last}" for s in missing)
            raise DnsChallengeError(
                f"TXT record {fqdn} not visible on {len(missing)} of {len(servers)} "
                f"nameserver(s) after {waited:.1f} s (timeout {timeout:g} s): {details}"
            )
        sleep(min(delay, max(deadline - clock(), 0.0)))
        delay = min(delay * GROWTH, MAX_DELAY)


def _serves(server: _Nameserver, fqdn: str, value: str, timeout: float) -> bool:
    """Ask the server's addresses in turn; the first that answers decides."""
    query = dns.message.make_query(fqdn, dns.rdatatype.TXT)
    query.flags &= ~dns.flags.RD  # an authoritative answer, not a recursive one
    errors: list[str] = []
    for host, port in server.addresses:
        try:
            response, _ = dns.query.udp_with_fallback(query, host, timeout=timeout, port=port)
        except dns.exception.Timeout:
            errors.append(f"no answer from {host}:{port} within {timeout:.2g} s")
            continue
        except (dns.exception.DNSException, OSError) as exc:
            errors.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
            continue
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            server.last = "no TXT record yet (NXDOMAIN)"
            return False
        if rcode != dns.rcode.NOERROR:
            server.last = f"answered {dns.rcode.to_text(rcode)}"
            return False
        values = _txt_values(response, fqdn)
        if value in values:
            return True
        server.last = f"TXT values {values}" if values else "no TXT record yet"
        return False
    server.last = "; ".join(errors) or "no address"
    return False


def _txt_values(response: dns.message.Message, fqdn: str) -> list[str]:
    name = dns.name.from_text(fqdn)
    values: list[str] = []
    for rrset in response.answer:
        if rrset.rdtype == dns.rdatatype.TXT and rrset.name == name:
            values.extend(b"".join(r.strings).decode("utf-8", "replace") for r in rrset)
    return values


def _configured(host: str, port: int) -> _Nameserver:
    label = f"{host}:{port}"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise DnsChallengeError(f"cannot resolve nameserver {label}: {exc}") from exc
        addresses = list(dict.fromkeys((str(i[4][0]), port) for i in infos))
        return _Nameserver(label=label, addresses=addresses)
    return _Nameserver(label=label, addresses=[(host, port)])


def _authoritative(fqdn: str, resolver: dns.resolver.Resolver, port: int) -> list[_Nameserver]:
    """The NS of the zone holding ``fqdn`` (after a CNAME, if the name is delegated)."""
    try:
        target = _follow_cname(fqdn, resolver)
        zone = dns.resolver.zone_for_name(target, resolver=resolver)
        ns_names = sorted(
            normalize_name(r.target.to_text()) for r in resolver.resolve(zone, dns.rdatatype.NS)
        )
    except dns.exception.DNSException as exc:
        raise DnsChallengeError(
            f"cannot find the authoritative nameservers for {fqdn}: {exc}"
        ) from exc
    servers: list[_Nameserver] = []
    for ns in ns_names:
        addresses: list[tuple[str, int]] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = resolver.resolve(ns, rdtype)
            except dns.exception.DNSException:
                continue  # e.g. no AAAA
            addresses.extend((r.address, port) for r in answer)
        if not addresses:
            raise DnsChallengeError(f"nameserver {ns} of {zone} has no A/AAAA address")
        first = addresses[0]
        servers.append(_Nameserver(label=f"{ns} ({first[0]}:{port})", addresses=addresses))
    if not servers:
        raise DnsChallengeError(f"zone {zone} of {fqdn} has no NS records")
    return servers


def _follow_cname(fqdn: str, resolver: dns.resolver.Resolver) -> str:
    """``_acme-challenge`` delegated by CNAME (peers.md 4.3): poll where the record lives."""
    try:
        answer = resolver.resolve(fqdn, dns.rdatatype.CNAME)
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return fqdn
    return normalize_name(answer[0].target.to_text())
