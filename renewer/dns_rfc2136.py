"""DNS-01 through RFC 2136 dynamic updates signed with TSIG (RFC 8945), e.g. BIND 9.

The zone is found by asking the configured server for SOA records, walking up from the
challenge name; updates and reads go over TCP to that same server.
"""

from __future__ import annotations

import logging

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsigkeyring
import dns.update

from renewer.dns_provider import TxtRecord, candidate_zones, in_zone, normalize_name
from renewer.errors import DnsChallengeError
from renewer.sensitive import Secret

log = logging.getLogger(__name__)

TTL = 60  # seconds; short so a stale value does not linger in resolvers' caches


class Rfc2136Dns:
    """``DnsProvider`` that sends TSIG-signed updates to one primary server."""

    def __init__(
        self,
        server: tuple[str, int],
        tsig_name: str | None,
        tsig_algorithm: str,
        tsig_secret: Secret | None,
        *,
        timeout: float = 10,
    ) -> None:
        if (tsig_name is None) != (tsig_secret is None):
            raise ValueError("tsig_name and tsig_secret go together")
        self._server = server
        self._tsig_name = tsig_name
        self._tsig_algorithm = tsig_algorithm
        self._tsig_secret = tsig_secret
        self._timeout = timeout
        self._zones: dict[str, str] = {}  # fqdn -> zone, per instance

    @property
    def _where(self) -> str:
        host, port = self._server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- DnsProvider -------------------------------------------------------------------

    def create_txt(self, fqdn: str, value: str) -> TxtRecord:
        fqdn = normalize_name(fqdn)
        zone = self.find_zone(fqdn)
        update = self._update(zone)
        update.add(dns.name.from_text(fqdn), TTL, _txt_rdata(value))
        self._send(update, f"adding TXT {fqdn}")
        log.info("Added TXT record %s on %s (zone %s)", fqdn, self._where, zone)
        return TxtRecord(fqdn=fqdn, value=value, zone=zone, record_id=None)

    def delete_txt(self, record: TxtRecord) -> None:
        # Deleting an RR that is not there is a no-op in RFC 2136 section 3.4.2.4,
        # so this is idempotent without a read first.
        update = self._update(record.zone)
        update.delete(dns.name.from_text(record.fqdn), _txt_rdata(record.value))
        self._send(update, f"removing TXT {record.fqdn}")
        log.info("Removed TXT record %s on %s", record.fqdn, self._where)

    def list_stale_txt(self, fqdn: str) -> list[TxtRecord]:
        # Every TXT at an _acme-challenge name is ours: nothing else belongs there.
        fqdn = normalize_name(fqdn)
        zone = self.find_zone(fqdn)
        query = dns.message.make_query(fqdn, dns.rdatatype.TXT)
        response = self._exchange(query, f"reading TXT {fqdn}", sign=False)
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return []
        if rcode != dns.rcode.NOERROR:
            raise self._rcode_error(f"reading TXT {fqdn}", rcode)
        records: list[TxtRecord] = []
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.TXT:
                continue
            for rdata in rrset:
                value = b"".join(rdata.strings).decode("utf-8", "replace")
                records.append(TxtRecord(fqdn=fqdn, value=value, zone=zone, record_id=None))
        return records

    # -- zone ----------------------------------------------------------------------------

    def find_zone(self, fqdn: str) -> str:
        """The zone holding ``fqdn`` on this server, from SOA queries walking up labels."""
        fqdn = normalize_name(fqdn)
        cached = self._zones.get(fqdn)
        if cached:
            return cached
        for candidate in candidate_zones(fqdn):
            query = dns.message.make_query(candidate, dns.rdatatype.SOA)
            response = self._exchange(query, f"looking up the zone of {fqdn}", sign=False)
            if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                continue  # REFUSED etc.: the server is not authoritative for this name
            for rrset in response.answer:
                if rrset.rdtype == dns.rdatatype.SOA:
                    zone = normalize_name(rrset.name.to_text())
                    if zone == candidate:
                        self._zones[fqdn] = zone
                        return zone
            # An authoritative answer for a name below the apex carries the SOA in the
            # authority section: that names the zone directly (RFC 2308 section 3).
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA:
                    zone = normalize_name(rrset.name.to_text())
                    if in_zone(fqdn, zone):
                        self._zones[fqdn] = zone
                        return zone
        raise DnsChallengeError(
            f"DNS server {self._where} is not authoritative for any zone containing {fqdn}"
        )

    # -- plumbing --------------------------------------------------------------------------

    def _update(self, zone: str) -> dns.update.UpdateMessage:
        if self._tsig_name is None or self._tsig_secret is None:
            return dns.update.UpdateMessage(zone)
        # The keyring is built here, at the call site, and not kept: dnspython's Key repr
        # shows the secret.
        keyring = dns.tsigkeyring.from_text(
            {self._tsig_name: (self._tsig_algorithm, self._tsig_secret.reveal())}
        )
        return dns.update.UpdateMessage(
            zone,
            keyring=keyring,
            keyname=dns.name.from_text(self._tsig_name),
            keyalgorithm=self._tsig_algorithm,
        )

    def _send(self, update: dns.update.UpdateMessage, what: str) -> None:
        response = self._exchange(update, what, sign=True)
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise self._rcode_error(what, rcode)

    def _exchange(
        self, message: dns.message.Message, what: str, *, sign: bool
    ) -> dns.message.Message:
        host, port = self._server
        try:
            return dns.query.tcp(message, host, port=port, timeout=self._timeout)
        except dns.exception.Timeout as exc:
            raise DnsChallengeError(
                f"DNS server {self._where} did not answer within {self._timeout:g} s ({what})"
            ) from exc
        except dns.exception.DNSException as exc:
            # TSIG failures on the reply (BADSIG/BADKEY/BADTIME) land here.
            hint = " Check the TSIG key name, algorithm and secret." if sign else ""
            raise DnsChallengeError(
                f"DNS server {self._where} failed {what}: {type(exc).__name__}: {exc}.{hint}"
            ) from exc
        except OSError as exc:
            raise DnsChallengeError(
                f"cannot reach DNS server {self._where} ({what}): {exc}"
            ) from exc

    def _rcode_error(self, what: str, rcode: dns.rcode.Rcode) -> DnsChallengeError:
        text = dns.rcode.to_text(rcode)
        hint = ""
        if rcode in (dns.rcode.NOTAUTH, dns.rcode.REFUSED):
            hint = (
                " The server rejected the update: check that the TSIG key name, algorithm"
                " and secret (RFC2136_TSIG_SECRET) match the server's key and that the"
                " zone allows updates with it."
            )
        return DnsChallengeError(f"DNS server {self._where} answered {text} {what}.{hint}")


def _txt_rdata(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    # Built from the raw string, not parsed from zone-file text: no quoting to get wrong.
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode("utf-8")])
