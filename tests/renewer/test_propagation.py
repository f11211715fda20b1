"""wait_for_txt against real BIND servers on loopback: quick detection, clear timeouts."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import dns.resolver
import pytest

from emulators.bind import BindServer, generate_tsig_secret
from emulators.cloudflare_api import CloudflareApi, TokenScope, new_token
from emulators.dns_server import DnsServer, RecordStore
from renewer.dns_cloudflare import CloudflareDns
from renewer.dns_provider import TxtRecord
from renewer.dns_rfc2136 import Rfc2136Dns
from renewer.errors import DnsChallengeError
from renewer.propagation import FIRST_DELAY, MAX_DELAY, wait_for_txt
from renewer.sensitive import Secret

pytestmark = pytest.mark.integration

KEY = "renewer-key"
SECRET = generate_tsig_secret()
NAME = "_acme-challenge.smtp.example.com"


def _start(tmp_path_factory: pytest.TempPathFactory, label: str) -> BindServer:
    return BindServer(
        tmp_path_factory.mktemp(label), ["example.com"], tsig_name=KEY, tsig_secret_b64=SECRET
    ).start()


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BindServer]:
    server = _start(tmp_path_factory, "primary")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secondary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BindServer]:
    # Same zone, separate data: stands for a nameserver that has not caught up.
    server = _start(tmp_path_factory, "secondary")
    yield server
    server.stop()


def _dns(server: BindServer) -> Rfc2136Dns:
    return Rfc2136Dns(server.address, KEY, "hmac-sha256", Secret(SECRET), timeout=2)


def test_record_published_later_is_detected_quickly(primary: BindServer) -> None:
    published_at: list[float] = []

    def publish() -> None:
        time.sleep(0.7)
        _dns(primary).create_txt(NAME, "late-value")
        published_at.append(time.monotonic())

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        waited = wait_for_txt(NAME, "late-value", nameservers=[primary.address], timeout=10)
        seen_at = time.monotonic()
    finally:
        thread.join()
    latency = seen_at - published_at[0]
    print(f"\nTXT visible after {waited:.3f} s; detection latency {latency * 1000:.0f} ms")
    assert 0.6 < waited < 3
    assert latency < MAX_DELAY + 0.3  # one poll interval at most, plus a query
    _dns(primary).delete_txt(_dns(primary).list_stale_txt(NAME)[0])


def test_record_already_there_returns_at_once(primary: BindServer) -> None:
    record = _dns(primary).create_txt(NAME, "present")
    try:
        assert wait_for_txt(NAME, "present", nameservers=[primary.address], timeout=5) < 0.5
    finally:
        _dns(primary).delete_txt(record)


def test_never_visible_names_the_nameserver(primary: BindServer) -> None:
    start = time.monotonic()
    with pytest.raises(DnsChallengeError) as info:
        wait_for_txt(NAME, "never", nameservers=[primary.address], timeout=0.6)
    elapsed = time.monotonic() - start
    assert f"{primary.host}:{primary.port}" in str(info.value)
    assert "no TXT record yet" in str(info.value)
    assert 0.6 <= elapsed < 2


def test_wrong_value_is_not_accepted(primary: BindServer) -> None:
    record = _dns(primary).create_txt(NAME, "old-value")
    try:
        with pytest.raises(DnsChallengeError, match="old-value"):
            wait_for_txt(NAME, "new-value", nameservers=[primary.address], timeout=0.4)
    finally:
        _dns(primary).delete_txt(record)


def test_every_nameserver_must_serve_it(primary: BindServer, secondary: BindServer) -> None:
    record = _dns(primary).create_txt(NAME, "both")
    try:
        with pytest.raises(DnsChallengeError) as info:
            wait_for_txt(
                NAME, "both", nameservers=[primary.address, secondary.address], timeout=0.5
            )
        message = str(info.value)
        assert "1 of 2" in message
        assert f"127.0.0.1:{secondary.port}" in message
        assert f"127.0.0.1:{primary.port}" not in message
        # Once the lagging server has it too, the wait succeeds.
        late = _dns(secondary).create_txt(NAME, "both")
        try:
            wait_for_txt(NAME, "both", nameservers=[primary.address, secondary.address], timeout=5)
        finally:
            _dns(secondary).delete_txt(late)
    finally:
        _dns(primary).delete_txt(record)


def test_nameservers_found_through_ns_records(primary: BindServer) -> None:
    # The resolver stands in for the system one; NS ns1.example.com -> A 127.0.0.1, and
    # ns_port points the direct queries at the same loopback BIND.
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [primary.host]
    resolver.port = primary.port
    record = _dns(primary).create_txt(NAME, "via-ns")
    try:
        waited = wait_for_txt(
            NAME, "via-ns", nameservers=None, timeout=5, resolver=resolver, ns_port=primary.port
        )
        assert waited < 1
        with pytest.raises(DnsChallengeError, match=r"ns1\.example\.com \(127\.0\.0\.1:"):
            wait_for_txt(
                NAME, "other", nameservers=[], timeout=0.3, resolver=resolver, ns_port=primary.port
            )
    finally:
        _dns(primary).delete_txt(record)
    with pytest.raises(DnsChallengeError, match="authoritative nameservers"):
        wait_for_txt(
            "_acme-challenge.example.org", "x", nameservers=None, timeout=1, resolver=resolver
        )


def test_poll_interval_grows_from_20ms_to_half_a_second(primary: BindServer) -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    with pytest.raises(DnsChallengeError):
        wait_for_txt(
            NAME,
            "never",
            nameservers=[primary.address],
            timeout=5,
            clock=lambda: now[0],
            sleep=sleep,
        )
    assert sleeps[0] == pytest.approx(FIRST_DELAY)
    assert max(sleeps) == pytest.approx(MAX_DELAY)
    assert all(b >= a for a, b in itertools.pairwise(sleeps[:-1]))  # the last is cut short
    assert sum(sleeps) == pytest.approx(5)


def test_unreachable_nameserver_times_out_with_reason() -> None:
    with pytest.raises(DnsChallengeError, match=r"127\.0\.0\.1:9.*no answer"):
        wait_for_txt(NAME, "x", nameservers=[("127.0.0.1", 9)], timeout=0.3)


def test_cloudflare_emulator_to_loopback_dns_end_to_end() -> None:
    # The demo's path: CloudflareDns -> API emulator -> RecordStore -> DnsServer -> poll.
    store = RecordStore()
    token = new_token()
    zone_id = "9" * 32
    with (
        CloudflareApi(store, {"example.com": zone_id}, {token: TokenScope()}) as api,
        DnsServer(store, ["example.com"]) as server,
    ):
        cloudflare = CloudflareDns(api.base_url, Secret(token), {"example.com": zone_id})
        published_at: list[float] = []
        records: list[TxtRecord] = []

        def publish() -> None:
            time.sleep(0.4)
            records.append(cloudflare.create_txt(NAME, "cf-value"))
            published_at.append(time.monotonic())

        thread = threading.Thread(target=publish)
        thread.start()
        try:
            wait_for_txt(NAME, "cf-value", nameservers=[server.address], timeout=10)
            seen_at = time.monotonic()
        finally:
            thread.join()
        latency = seen_at - published_at[0]
        print(f"\nCloudflare emulator -> DnsServer: detection latency {latency * 1000:.0f} ms")
        assert latency < MAX_DELAY + 0.3
        cloudflare.delete_txt(records[0])
        with pytest.raises(DnsChallengeError, match="no TXT record yet"):
            wait_for_txt(NAME, "cf-value", nameservers=[server.address], timeout=0.3)


def test_truncated_udp_answer_falls_back_to_tcp() -> None:
    store = RecordStore()
    for i in range(30):  # ~30 x 45 bytes: more than 512 bytes over UDP without EDNS
        store.add(NAME, "TXT", f"{i:02d}" + "x" * 41)
    store.add(NAME, "TXT", "wanted")
    with DnsServer(store, ["example.com"]) as server:
        wait_for_txt(NAME, "wanted", nameservers=[server.address], timeout=5)
        transports = [t for name, rtype, t in server.queries() if name == NAME]
    assert transports[:2] == ["udp", "tcp"]
