"""Shared loopback fixtures: the authoritative DNS server Pebble asks, Pebble 2.10 itself,
and a Cloudflare-compatible API writing into the same records.

- ``dns_store``: the ``RecordStore`` behind the DNS server (session scope; tests use their
  own names, see ``unique_domain``).
- ``dns_server``: authoritative for ``ZONES`` on 127.0.0.1 (UDP+TCP).
- ``pebble``: Pebble with one profile ("default", 90 days), no validation sleep, no
  authorization reuse, no rejected nonces. Pebble gives a *random* profile to orders that
  name none, so a fixture with several profiles would make validity random; start your
  own ``PebbleServer(..., profiles=LETSENCRYPT_PROFILES)`` for profile tests.
- ``cloudflare``: the Cloudflare emulator for ``ZONES`` with one all-zones token.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from emulators.cloudflare_api import CloudflareApi, TokenScope, new_token
from emulators.dns_server import DnsServer, RecordStore
from emulators.pebble import PebbleServer
from renewer.sensitive import Secret

ZONES = {
    "example.com": "0123456789abcdef0123456789abcdef",
    "example.net": "fedcba9876543210fedcba9876543210",
}
_counter = itertools.count(1)


def unique_domain(zone: str = "example.com") -> str:
    """A fresh name per call, so tests sharing the session's DNS and CA never collide."""
    return f"t{next(_counter)}.{zone}"


@dataclass(frozen=True)
class CloudflareSetup:
    api: CloudflareApi
    token: Secret
    zone_ids: dict[str, str]

    @property
    def base_url(self) -> str:
        return self.api.base_url


@pytest.fixture(scope="session")
def dns_store() -> RecordStore:
    return RecordStore()


@pytest.fixture(scope="session")
def dns_server(dns_store: RecordStore) -> Iterator[DnsServer]:
    with DnsServer(dns_store, ZONES) as server:
        yield server


@pytest.fixture(scope="session")
def pebble(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer
) -> Iterator[PebbleServer]:
    workdir: Path = tmp_path_factory.mktemp("pebble")
    with PebbleServer(workdir, dns_server.address) as server:
        yield server


@pytest.fixture(scope="session")
def cloudflare(dns_store: RecordStore) -> Iterator[CloudflareSetup]:
    token = new_token()
    with CloudflareApi(dns_store, ZONES, {token: TokenScope()}) as api:
        yield CloudflareSetup(api, Secret(token), dict(ZONES))
