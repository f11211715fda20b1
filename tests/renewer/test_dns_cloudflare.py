"""CloudflareDns against the Cloudflare API emulator: real HTTP on loopback, faults injected."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from emulators.cloudflare_api import CloudflareApi, TokenScope, new_token
from emulators.dns_server import RecordStore
from renewer.dns_cloudflare import CloudflareDns, cloudflare_session
from renewer.dns_provider import TxtRecord
from renewer.errors import DnsChallengeError
from renewer.sensitive import Secret

pytestmark = pytest.mark.integration

ZONE_COM = "1" * 32
ZONE_NET = "2" * 32
ZONE_SUB = "3" * 32
FULL = new_token()
COM_ONLY = new_token()
EDIT_ONLY = new_token()  # DNS Write on example.com, no Zone Read
NET_ONLY = new_token()
READ_ONLY = new_token()
NAME = "_acme-challenge.smtp.example.com"
ALL_TOKENS = (FULL, COM_ONLY, EDIT_ONLY, NET_ONLY, READ_ONLY)


@pytest.fixture
def store() -> RecordStore:
    return RecordStore()


@pytest.fixture
def api(store: RecordStore) -> Iterator[CloudflareApi]:
    tokens = {
        FULL: TokenScope(None, can_list_zones=True, can_edit_dns=True),
        COM_ONLY: TokenScope(frozenset({ZONE_COM}), can_list_zones=True, can_edit_dns=True),
        EDIT_ONLY: TokenScope(frozenset({ZONE_COM}), can_list_zones=False, can_edit_dns=True),
        NET_ONLY: TokenScope(frozenset({ZONE_NET}), can_list_zones=True, can_edit_dns=True),
        READ_ONLY: TokenScope(None, can_list_zones=True, can_edit_dns=False),
    }
    zones = {"example.com": ZONE_COM, "example.net": ZONE_NET, "sub.example.net": ZONE_SUB}
    with CloudflareApi(store, zones, tokens) as server:
        yield server


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client(
    api: CloudflareApi,
    token: str = FULL,
    zone_ids: dict[str, str] | None = None,
    sleep: Sleeps | None = None,
    **session: Any,
) -> CloudflareDns:
    sess = cloudflare_session(
        api.base_url, Secret(token), sleep=sleep or Sleeps(), **{"timeout": 5.0, **session}
    )
    return CloudflareDns(api.base_url, Secret(token), zone_ids or {}, session=sess)


def paths(api: CloudflareApi) -> list[tuple[str, str, int]]:
    return [(r.method, r.path.removeprefix("/client/v4"), r.status) for r in api.requests]


def test_create_and_delete_with_zone_lookup(api: CloudflareApi, store: RecordStore) -> None:
    dns_ = client(api)
    record = dns_.create_txt("_ACME-Challenge.smtp.example.com.", "token-value")
    assert record.fqdn == NAME
    assert record.zone == "example.com"
    assert record.value == "token-value"
    assert record.record_id is not None
    assert store.values(NAME, "TXT") == ["token-value"]
    [stored] = api.records(ZONE_COM)
    assert stored["content"] == '"token-value"'
    assert stored["ttl"] == 60
    assert stored["comment"] == "cert-renewer"
    # The walk tried the longest names first and stopped at the zone.
    lookups = [r.query["name"][0] for r in api.requests if r.path.endswith("/zones")]
    assert lookups == [NAME, "smtp.example.com", "example.com"]

    dns_.delete_txt(record)
    assert store.values(NAME, "TXT") == []
    assert api.records() == []
    dns_.delete_txt(record)  # idempotent: 81044 counts as gone
    assert paths(api)[-1] == ("DELETE", f"/zones/{ZONE_COM}/dns_records/{record.record_id}", 404)


def test_zone_lookup_is_cached_per_instance(api: CloudflareApi) -> None:
    dns_ = client(api)
    first = dns_.create_txt(NAME, "a")
    second = dns_.create_txt(NAME, "b")
    zone_gets = [p for p in paths(api) if p[1] == "/zones"]
    assert len(zone_gets) == 3  # one walk, not two
    assert client(api).find_zone(NAME) == ("example.com", ZONE_COM)  # new instance: new walk
    assert len([p for p in paths(api) if p[1] == "/zones"]) == 6
    for rec in (first, second):
        dns_.delete_txt(rec)


def test_longest_zone_wins(api: CloudflareApi, store: RecordStore) -> None:
    record = client(api).create_txt("_acme-challenge.mx.sub.example.net", "v")
    assert record.zone == "sub.example.net"
    assert api.records(ZONE_SUB)[0]["name"] == "_acme-challenge.mx.sub.example.net"
    assert api.records(ZONE_NET) == []
    configured = client(api, zone_ids={"example.net": ZONE_NET, "sub.example.net": ZONE_SUB})
    assert configured.find_zone("_acme-challenge.a.sub.example.net") == (
        "sub.example.net",
        ZONE_SUB,
    )
    assert configured.find_zone("_acme-challenge.example.net") == ("example.net", ZONE_NET)


def test_configured_zone_id_needs_no_zone_read(api: CloudflareApi, store: RecordStore) -> None:
    dns_ = client(api, token=EDIT_ONLY, zone_ids={"Example.com.": ZONE_COM})
    record = dns_.create_txt(NAME, "scoped")
    assert record.zone == "example.com"
    assert store.values(NAME, "TXT") == ["scoped"]
    assert not any(p[1] == "/zones" for p in paths(api))  # no lookup at all
    assert [r.value for r in dns_.list_stale_txt(NAME)] == ["scoped"]
    dns_.delete_txt(record)
    assert api.records() == []


def test_token_that_cannot_list_zones_without_zone_ids(api: CloudflareApi) -> None:
    with pytest.raises(DnsChallengeError) as info:
        client(api, token=EDIT_ONLY).create_txt(NAME, "v")
    message = str(info.value)
    assert "zone_ids" in message
    assert "Zone:Zone:Read" in message
    # Every candidate was tried: 10000 on a candidate means "not this zone", not "stop".
    assert len([p for p in paths(api) if p[1] == "/zones"]) == 3
    assert api.records() == []


def test_zone_walk_skips_refused_candidates_and_finds_visible_zone(api: CloudflareApi) -> None:
    api.inject_fault("GET", "/zones", status=403, times=2)  # names the token may not see
    record = client(api, token=COM_ONLY).create_txt(NAME, "v")
    assert record.zone == "example.com"
    assert [p[2] for p in paths(api) if p[1] == "/zones"] == [403, 403, 200]


def test_zone_not_visible_to_token(api: CloudflareApi) -> None:
    with pytest.raises(DnsChallengeError, match=r"no Cloudflare zone .* contains"):
        client(api, token=NET_ONLY).create_txt(NAME, "v")


@pytest.mark.parametrize(
    ("token", "hint"),
    [
        (FULL[:-1], "entire API token"),  # truncated: 6003
        (new_token(), "valid Cloudflare API token"),  # unknown: 9109
    ],
)
def test_bad_credentials_stop_the_walk_with_a_hint(
    api: CloudflareApi, token: str, hint: str
) -> None:
    dns_ = CloudflareDns(api.base_url, Secret(token), {}, session=None)
    with pytest.raises(DnsChallengeError, match=hint) as info:
        dns_.create_txt(NAME, "v")
    assert len(api.requests) == 1  # hard failure on the first candidate
    assert token not in str(info.value)


def test_permanent_403_names_the_zone(api: CloudflareApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    dns_ = client(api, token=READ_ONLY)
    with pytest.raises(DnsChallengeError) as info:
        dns_.create_txt(NAME, "v")
    message = str(info.value)
    assert "example.com" in message
    assert "403" in message
    assert "Zone:DNS:Edit" in message
    assert READ_ONLY not in message
    assert READ_ONLY not in caplog.text
    posts = [p for p in paths(api) if p[0] == "POST"]
    assert [p[2] for p in posts] == [403]  # not retried


def test_token_scoped_to_another_zone_with_configured_id(api: CloudflareApi) -> None:
    dns_ = client(api, token=NET_ONLY, zone_ids={"example.com": ZONE_COM})
    with pytest.raises(DnsChallengeError, match=r"zone example\.com.*Authentication error"):
        dns_.create_txt(NAME, "v")


def test_duplicate_counts_as_success(api: CloudflareApi, store: RecordStore) -> None:
    first = client(api).create_txt(NAME, "same")
    again = client(api).create_txt(NAME, "same")
    assert again.record_id == first.record_id  # found by listing after 81058
    assert ("POST", f"/zones/{ZONE_COM}/dns_records", 400) in paths(api)
    assert store.values(NAME, "TXT") == ["same"]
    client(api).delete_txt(again)
    assert api.records() == []


def test_duplicate_of_unquoted_legacy_record(api: CloudflareApi, store: RecordStore) -> None:
    legacy = api.add_record(ZONE_COM, NAME, "legacy")  # as an older client wrote it
    found = client(api)._find_ids(ZONE_COM, NAME, "legacy")
    assert found == [legacy]
    # delete without an id looks it up by name and content
    client(api, zone_ids={"example.com": ZONE_COM}).delete_txt(
        TxtRecord(NAME, "legacy", "example.com", None)
    )
    assert api.records() == []
    assert store.values(NAME, "TXT") == []


def test_list_stale_returns_only_ours(api: CloudflareApi) -> None:
    ours = api.add_record(ZONE_COM, NAME, '"left-over"', comment="cert-renewer")
    api.add_record(ZONE_COM, NAME, '"someone-else"')
    api.add_record(ZONE_COM, "_acme-challenge.other.example.com", '"x"', comment="cert-renewer")
    stale = client(api).list_stale_txt(NAME)
    assert stale == [TxtRecord(NAME, "left-over", "example.com", ours)]


def test_list_stale_pages_through_results(api: CloudflareApi) -> None:
    for i in range(105):
        api.add_record(ZONE_COM, NAME, f'"v{i}"', comment="cert-renewer")
    stale = client(api).list_stale_txt(NAME)
    assert len(stale) == 105
    assert {r.value for r in stale} == {f"v{i}" for i in range(105)}


def test_429_then_success_honours_retry_after(api: CloudflareApi, store: RecordStore) -> None:
    sleeps = Sleeps()
    api.inject_fault("POST", "/zones/*/dns_records", status=429, times=2, retry_after=3)
    record = client(api, zone_ids={"example.com": ZONE_COM}, sleep=sleeps).create_txt(NAME, "v")
    assert record.record_id
    assert sleeps.calls == [3, 3]
    assert [p[2] for p in paths(api) if p[0] == "POST"] == [429, 429, 200]
    assert store.values(NAME, "TXT") == ["v"]


def test_429_for_longer_than_we_wait_fails(api: CloudflareApi) -> None:
    # A.5: over the limit, every call gets 429 for the next 5 minutes.
    api.inject_fault("POST", "/zones/*/dns_records", status=429, times=10, retry_after=300)
    with pytest.raises(DnsChallengeError, match=r"429.*example\.com|example\.com.*429"):
        client(api, zone_ids={"example.com": ZONE_COM}).create_txt(NAME, "v")


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_then_success(api: CloudflareApi, store: RecordStore, status: int) -> None:
    sleeps = Sleeps()
    api.inject_fault("*", "/zones*", status=status, times=2)
    record = client(api, sleep=sleeps).create_txt(NAME, "v")
    assert record.zone == "example.com"
    assert len(sleeps.calls) == 2
    assert store.values(NAME, "TXT") == ["v"]


def test_5xx_that_never_ends_fails(api: CloudflareApi) -> None:
    api.inject_fault("POST", "/zones/*/dns_records", status=503, times=100)
    with pytest.raises(DnsChallengeError, match="503"):
        client(api, zone_ids={"example.com": ZONE_COM}, max_attempts=3).create_txt(NAME, "v")
    assert len([p for p in paths(api) if p[0] == "POST"]) == 3


def test_timeout_then_success(api: CloudflareApi, store: RecordStore) -> None:
    api.inject_fault("POST", "/zones/*/dns_records", status=503, delay=0.6)
    dns_ = client(api, zone_ids={"example.com": ZONE_COM}, timeout=0.25)
    record = dns_.create_txt(NAME, "v")
    assert record.record_id
    assert store.values(NAME, "TXT") == ["v"]


def test_post_that_timed_out_but_went_through(api: CloudflareApi, store: RecordStore) -> None:
    # The first POST is applied but its answer is late: the retry meets 81058 and the id
    # is found by listing, so exactly one record exists and we can delete it.
    api.inject_fault("POST", "/zones/*/dns_records", status=200, delay=0.6)
    dns_ = client(api, zone_ids={"example.com": ZONE_COM}, timeout=0.25)
    record = dns_.create_txt(NAME, "v")
    [stored] = api.records()
    assert record.record_id == stored["id"]
    dns_.delete_txt(record)
    assert store.values(NAME, "TXT") == []


def test_timeouts_that_never_end_fail(api: CloudflareApi) -> None:
    api.inject_fault("POST", "/zones/*/dns_records", status=503, times=5, delay=0.4)
    dns_ = client(api, zone_ids={"example.com": ZONE_COM}, timeout=0.15, max_attempts=2)
    with pytest.raises(DnsChallengeError, match="timed out"):
        dns_.create_txt(NAME, "v")


def test_secret_never_in_repr_or_errors(api: CloudflareApi) -> None:
    dns_ = client(api, token=READ_ONLY)
    assert READ_ONLY not in repr(vars(dns_))
    with pytest.raises(DnsChallengeError) as info:
        dns_.create_txt(NAME, "v")
    for token in ALL_TOKENS:
        assert token not in str(info.value)
