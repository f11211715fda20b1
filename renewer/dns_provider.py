"""What the ACME step needs from a DNS provider: publish, find and remove DNS-01 TXT records.

Two implementations: ``dns_cloudflare.CloudflareDns`` (Cloudflare API v4) and
``dns_rfc2136.Rfc2136Dns`` (TSIG-signed dynamic updates, e.g. BIND 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# The label every DNS-01 record lives under (RFC 8555 section 8.4).
ACME_CHALLENGE_LABEL = "_acme-challenge"


@dataclass(frozen=True)
class TxtRecord:
    fqdn: str  # "_acme-challenge.smtp.example.com" (lowercase, no trailing dot)
    value: str  # the challenge value, unquoted
    zone: str  # "example.com"
    record_id: str | None  # provider's id (Cloudflare) or None (RFC 2136)


class DnsProvider(Protocol):
    def create_txt(self, fqdn: str, value: str) -> TxtRecord:
        """Publish a TXT record; raises DnsChallengeError."""
        ...

    def delete_txt(self, record: TxtRecord) -> None:
        """Remove a record created earlier; idempotent; raises DnsChallengeError."""
        ...

    def list_stale_txt(self, fqdn: str) -> list[TxtRecord]:
        """TXT records at ``fqdn`` that an earlier run of ours left behind."""
        ...


def normalize_name(name: str) -> str:
    """Lowercase, without the trailing dot: the one spelling used across providers."""
    return name.strip().rstrip(".").lower()


def challenge_fqdn(domain: str) -> str:
    """``smtp.example.com`` -> ``_acme-challenge.smtp.example.com`` (wildcards drop ``*.``)."""
    name = normalize_name(domain)
    name = name.removeprefix("*.")
    return f"{ACME_CHALLENGE_LABEL}.{name}"


def candidate_zones(fqdn: str) -> list[str]:
    """Every parent of ``fqdn`` from the longest to the shortest with at least two labels
    (``a.b.example.com`` -> ``a.b.example.com``, ``b.example.com``, ``example.com``),
    the order in which certbot walks names to find the zone."""
    labels = normalize_name(fqdn).split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


def in_zone(fqdn: str, zone: str) -> bool:
    name, zone = normalize_name(fqdn), normalize_name(zone)
    return name == zone or name.endswith("." + zone)
