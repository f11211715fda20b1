"""The Cloudflare API v4 emulator speaks the documented shapes (cloudflare-mailpace-acme.md A)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dns.message
import dns.query
import dns.rdatatype
import pytest
import requests

from emulators.cloudflare_api import CloudflareApi, TokenScope, dns_value, new_token
from emulators.dns_server import DnsServer, RecordStore

pytestmark = pytest.mark.integration

ZONE_COM = "a" * 32
ZONE_NET = "b" * 32
FULL = new_token()
COM_ONLY = new_token()
EDIT_ONLY = new_token()
READ_ONLY = new_token()
UNKNOWN = new_token()
NAME = "_acme-challenge.smtp.example.com"


@pytest.fixture
def store() -> RecordStore:
    return RecordStore()


@pytest.fixture
def api(store: RecordStore) -> Iterator[CloudflareApi]:
    tokens = {
        FULL: TokenScope(None, can_list_zones=True, can_edit_dns=True),
        COM_ONLY: TokenScope(frozenset({ZONE_COM}), can_list_zones=True, can_edit_dns=True),
        EDIT_ONLY: TokenScope(frozenset({ZONE_COM}), can_list_zones=False, can_edit_dns=True),
        READ_ONLY: TokenScope(None, can_list_zones=True, can_edit_dns=False),
    }
    zones = {"example.com": ZONE_COM, "example.net": ZONE_NET}
    with CloudflareApi(store, zones, tokens) as server:
        yield server


def call(
    api: CloudflareApi,
    method: str,
    path: str,
    *,
    token: str | None = FULL,
    timeout: float = 5,
    **kwargs: Any,
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    return requests.request(method, api.base_url + path, headers=headers, timeout=timeout, **kwargs)


def create(api: CloudflareApi, content: str = '"v1"', **extra: Any) -> requests.Response:
    body = {"type": "TXT", "name": NAME, "content": content, "ttl": 60, **extra}
    return call(api, "POST", f"/zones/{ZONE_COM}/dns_records", json=body)


def error_of(resp: requests.Response) -> dict[str, Any]:
    body = resp.json()
    assert body["success"] is False
    assert body["result"] is None
    assert body["messages"] == []
    return dict(body["errors"][0])


def test_base_url_and_zone_lookup(api: CloudflareApi) -> None:
    assert api.base_url.startswith("http://127.0.0.1:")
    assert api.base_url.endswith("/client/v4")
    resp = call(api, "GET", "/zones", params={"name": "example.com", "per_page": 50})
    body = resp.json()
    assert resp.status_code == 200
    assert body["success"] is True
    assert body["errors"] == [] and body["messages"] == []
    assert [z["id"] for z in body["result"]] == [ZONE_COM]
    assert body["result"][0]["name"] == "example.com"
    assert body["result_info"] == {
        "page": 1,
        "per_page": 50,
        "count": 1,
        "total_count": 1,
        "total_pages": 1,
    }
    # Negative controls: a name that is not a zone gives an empty list, not an error.
    empty = call(api, "GET", "/zones", params={"name": "smtp.example.com"}).json()
    assert empty["success"] is True and empty["result"] == []
    assert len(call(api, "GET", "/zones").json()["result"]) == 2
    detail = call(api, "GET", f"/zones/{ZONE_NET}").json()
    assert detail["result"]["name"] == "example.net"
    assert "result_info" not in detail


def test_txt_record_life_cycle_reaches_dns(api: CloudflareApi, store: RecordStore) -> None:
    resp = create(api, comment="cert-renewer")
    assert resp.status_code == 200
    record = resp.json()["result"]
    assert len(record["id"]) == 32
    assert record["name"] == NAME
    assert record["type"] == "TXT"
    assert record["content"] == '"v1"'  # the API keeps the quotes (A.4)
    assert record["ttl"] == 60
    assert record["comment"] == "cert-renewer"
    assert record["proxied"] is False
    assert store.values(NAME, "TXT") == ["v1"]  # DNS serves it unquoted

    with DnsServer(store, ["example.com"]) as server:
        host, port = server.address
        answer = dns.query.udp(dns.message.make_query(NAME, "TXT"), host, port=port, timeout=2)
        assert [b"".join(r.strings) for r in answer.answer[0]] == [b"v1"]

    listed = call(
        api,
        "GET",
        f"/zones/{ZONE_COM}/dns_records",
        params={"type": "TXT", "name.exact": NAME, "content.exact": '"v1"'},
    ).json()
    assert [r["id"] for r in listed["result"]] == [record["id"]]
    assert listed["result_info"]["total_count"] == 1
    # Negative control: the unquoted form does not match content.exact.
    unquoted = call(
        api, "GET", f"/zones/{ZONE_COM}/dns_records", params={"content.exact": "v1"}
    ).json()
    assert unquoted["result"] == []

    deleted = call(api, "DELETE", f"/zones/{ZONE_COM}/dns_records/{record['id']}")
    assert deleted.status_code == 200
    assert deleted.json()["result"] == {"id": record["id"]}
    assert store.values(NAME, "TXT") == []
    again = call(api, "DELETE", f"/zones/{ZONE_COM}/dns_records/{record['id']}")
    assert again.status_code == 404
    assert error_of(again)["code"] == 81044


def test_identical_duplicate_is_81058(api: CloudflareApi, store: RecordStore) -> None:
    assert create(api).status_code == 200
    dup = create(api)
    assert dup.status_code == 400
    assert error_of(dup) == {"code": 81058, "message": "An identical record already exists."}
    # Negative control: another value at the same name is fine (two authorizations).
    assert create(api, '"v2"').status_code == 200
    assert sorted(store.values(NAME, "TXT")) == ["v1", "v2"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"ttl": 30}, 9021),
        ({"ttl": 86401}, 9021),
        ({"ttl": "60"}, 9021),
        ({"type": "A"}, 1004),
        ({"content": ""}, 1004),
        ({"name": ""}, 1004),
        ({"proxied": True}, 9004),
    ],
)
def test_invalid_records_are_refused(
    api: CloudflareApi, store: RecordStore, body: dict[str, Any], code: int
) -> None:
    payload = {"type": "TXT", "name": NAME, "content": '"v"', "ttl": 60, **body}
    resp = call(api, "POST", f"/zones/{ZONE_COM}/dns_records", json=payload)
    assert resp.status_code == 400
    assert error_of(resp)["code"] == code
    assert store.names() == []


def test_ttl_1_relative_names_and_unquoted_content(api: CloudflareApi, store: RecordStore) -> None:
    auto = call(
        api,
        "POST",
        f"/zones/{ZONE_COM}/dns_records",
        json={"type": "TXT", "name": "_acme-challenge.mail", "content": "plain", "ttl": 1},
    ).json()["result"]
    assert auto["name"] == "_acme-challenge.mail.example.com"
    assert auto["ttl"] == 1
    assert store.values("_acme-challenge.mail.example.com", "TXT") == ["plain"]
    assert dns_value('"ab" "cd"') == "abcd"
    assert dns_value('"a\\"b"') == 'a"b'
    assert dns_value("no quotes") == "no quotes"


def test_invalid_json_body(api: CloudflareApi) -> None:
    resp = call(
        api,
        "POST",
        f"/zones/{ZONE_COM}/dns_records",
        data=b"{not json",
        headers={"Authorization": f"Bearer {FULL}", "Content-Type": "application/json"},
        token=None,
    )
    assert resp.status_code == 400
    assert resp.json()["success"] is False


def test_authentication_errors(api: CloudflareApi) -> None:
    missing = call(api, "GET", "/zones", token=None)
    assert missing.status_code == 400
    error = error_of(missing)
    assert error["code"] == 6003
    assert error["message"] == "Invalid request headers"
    assert error["error_chain"][0]["code"] == 6111
    truncated = call(api, "GET", "/zones", token=FULL[:-3])
    assert truncated.status_code == 400
    assert error_of(truncated)["code"] == 6003
    unknown = call(api, "GET", "/zones", token=UNKNOWN)
    assert unknown.status_code == 403
    assert error_of(unknown) == {"code": 9109, "message": "Invalid access token"}


def test_scoped_tokens(api: CloudflareApi) -> None:
    # Listing needs Zone Read; a token scoped to one zone sees only that zone.
    listed = call(api, "GET", "/zones", token=COM_ONLY).json()["result"]
    assert [z["name"] for z in listed] == ["example.com"]
    other = call(api, "GET", "/zones", token=COM_ONLY, params={"name": "example.net"}).json()
    assert other["result"] == []
    refused = call(api, "GET", "/zones", token=EDIT_ONLY, params={"name": "example.com"})
    assert refused.status_code == 403
    assert error_of(refused) == {"code": 10000, "message": "Authentication error"}
    # DNS Write on its zone works without Zone Read...
    ok = call(api, "GET", f"/zones/{ZONE_COM}/dns_records", token=EDIT_ONLY)
    assert ok.status_code == 200
    # ...but not on another zone, and a read-only token cannot write.
    outside = call(api, "GET", f"/zones/{ZONE_NET}/dns_records", token=EDIT_ONLY)
    assert outside.status_code == 403
    assert error_of(outside)["code"] == 10000
    body = {"type": "TXT", "name": NAME, "content": '"x"', "ttl": 60}
    no_edit = call(api, "POST", f"/zones/{ZONE_COM}/dns_records", token=READ_ONLY, json=body)
    assert no_edit.status_code == 403
    assert api.records() == []


def test_unknown_ids_and_routes(api: CloudflareApi) -> None:
    zone = call(api, "GET", "/zones/" + "c" * 32 + "/dns_records")
    assert zone.status_code == 404
    assert error_of(zone)["code"] == 7003
    record = call(api, "DELETE", f"/zones/{ZONE_COM}/dns_records/" + "d" * 32)
    assert record.status_code == 404
    assert error_of(record)["code"] == 81044
    route = call(api, "GET", "/nothing/here")
    assert route.status_code == 404
    assert error_of(route)["code"] == 7000


def test_token_verify(api: CloudflareApi) -> None:
    body = call(api, "GET", "/user/tokens/verify").json()
    assert body["success"] is True
    assert body["result"]["status"] == "active"
    assert FULL not in body["result"]["id"]
    assert body["messages"][0]["code"] == 10000
    assert call(api, "GET", "/user/tokens/verify", token=UNKNOWN).status_code == 403


def test_record_filters_and_pagination(api: CloudflareApi) -> None:
    for i in range(5):
        assert create(api, f'"v{i}"', comment="cert-renewer" if i % 2 else None).ok
    path = f"/zones/{ZONE_COM}/dns_records"
    page2 = call(api, "GET", path, params={"per_page": 2, "page": 2}).json()
    assert page2["result_info"] == {
        "page": 2,
        "per_page": 2,
        "count": 2,
        "total_count": 5,
        "total_pages": 3,
    }
    ours = call(api, "GET", path, params={"comment.exact": "cert-renewer"}).json()["result"]
    assert sorted(r["content"] for r in ours) == ['"v1"', '"v3"']
    by_name = call(api, "GET", path, params={"name": NAME.upper()}).json()["result"]
    assert len(by_name) == 5
    none = call(api, "GET", path, params={"name.exact": "other.example.com"}).json()["result"]
    assert none == []


def test_fault_429_then_normal(api: CloudflareApi) -> None:
    api.inject_fault("GET", "/zones", status=429, times=2, retry_after=7)
    for _ in range(2):
        resp = call(api, "GET", "/zones")
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "7"
        assert resp.headers["Ratelimit"] == '"default";r=0;t=7'
        assert "Ratelimit-Policy" in resp.headers
        assert error_of(resp)["code"] == 971
    assert call(api, "GET", "/zones").status_code == 200


def test_fault_5xx_bodies_and_patterns(api: CloudflareApi, store: RecordStore) -> None:
    api.inject_fault("POST", "/zones/*/dns_records", status=502)
    api.inject_fault("*", "/zones/*/dns_records", status=500)
    gateway = create(api)
    assert gateway.status_code == 502
    assert gateway.content == b""
    internal = create(api)
    assert internal.status_code == 500
    assert internal.json()["success"] is False
    assert store.names() == []  # a faulted request changes nothing
    assert call(api, "GET", "/zones").status_code == 200  # pattern did not match
    assert create(api).status_code == 200


def test_fault_delay_and_slow_success(api: CloudflareApi, store: RecordStore) -> None:
    api.inject_fault("POST", "/zones/*/dns_records", status=503, delay=0.5)
    with pytest.raises(requests.Timeout):
        call(api, "POST", f"/zones/{ZONE_COM}/dns_records", timeout=0.2, json={})
    # Below 400: only slow. The client times out but the record is created anyway.
    api.inject_fault("POST", "/zones/*/dns_records", status=200, delay=0.5)
    body = {"type": "TXT", "name": NAME, "content": '"late"', "ttl": 60}
    start = time.monotonic()
    with pytest.raises(requests.Timeout):
        call(api, "POST", f"/zones/{ZONE_COM}/dns_records", timeout=0.2, json=body)
    deadline = start + 3
    while not store.values(NAME, "TXT") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.values(NAME, "TXT") == ["late"]


def test_request_log_never_holds_the_token(api: CloudflareApi) -> None:
    call(api, "GET", "/zones", params={"name": "example.com"})
    call(api, "GET", "/zones", token=UNKNOWN)
    log = api.requests
    assert [(r.method, r.path, r.status) for r in log] == [
        ("GET", "/client/v4/zones", 200),
        ("GET", "/client/v4/zones", 403),
    ]
    assert log[0].query == {"name": ["example.com"]}
    assert FULL not in repr(log) and UNKNOWN not in repr(log)


def test_tokens_must_look_like_cloudflare_tokens(store: RecordStore) -> None:
    with pytest.raises(ValueError, match="40"):
        CloudflareApi(store, {"example.com": ZONE_COM}, {"short": TokenScope()})
    assert len(new_token()) == 40
