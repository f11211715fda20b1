"""issue_certificate against real Pebble 2.10 + the loopback DNS server + the Cloudflare
emulator (through the real CloudflareDns provider)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from emulators.dns_server import DnsServer, RecordStore
from emulators.pebble import LETSENCRYPT_PROFILES, PebbleServer
from renewer.acme_client import AccountKey, AcmeClient, open_account
from renewer.ari import cert_id, fetch_renewal_window
from renewer.dns_cloudflare import CloudflareDns
from renewer.dns_provider import TxtRecord
from renewer.errors import DnsChallengeError, IssuanceError
from renewer.issue import IssuedCertificate, IssueRequest, issue_certificate
from tests.integration.conftest import CloudflareSetup, unique_domain

pytestmark = pytest.mark.integration

UTC = datetime.UTC


def _client(pebble: PebbleServer, key: AccountKey | None = None) -> AcmeClient:
    return open_account(
        pebble.directory_url, key or AccountKey.generate(), "ops@example.com", pebble.ca_bundle
    )


def _provider(cloudflare: CloudflareSetup) -> CloudflareDns:
    return CloudflareDns(cloudflare.base_url, cloudflare.token, cloudflare.zone_ids)


def _issue(
    client: AcmeClient,
    dns: object,
    dns_server: DnsServer,
    domains: tuple[str, ...],
    *,
    profile: str | None = None,
    replaces: str | None = None,
    key_type: str = "ecdsa-p256",
    propagation_timeout: float = 10,
) -> IssuedCertificate:
    request = IssueRequest(
        name="smtp", domains=domains, key_type=key_type, profile=profile, replaces=replaces
    )
    return issue_certificate(
        request,
        client,
        dns,  # type: ignore[arg-type]
        nameservers=[dns_server.address],
        propagation_timeout=propagation_timeout,
    )


def _roots(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def _first_name(cert: x509.Certificate) -> str:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sans.get_values_for_type(x509.DNSName)[0]


def _verify(issued: IssuedCertificate, roots: list[x509.Certificate], name: str) -> None:
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(x509.DNSName(name))
    verifier.verify(issued.leaf, list(issued.chain))


def _challenge_records(store: RecordStore, domains: tuple[str, ...]) -> list[str]:
    return [v for d in domains for v in store.values(f"_acme-challenge.{d}", "TXT")]


@pytest.fixture(scope="module")
def client(pebble: PebbleServer) -> AcmeClient:
    return _client(pebble)


def test_first_issuance_verifies_to_pebble_root_and_cleans_up(
    pebble: PebbleServer,
    dns_server: DnsServer,
    dns_store: RecordStore,
    cloudflare: CloudflareSetup,
    client: AcmeClient,
) -> None:
    domains = (unique_domain(), unique_domain("example.net"))
    queries_before = len(dns_server.queries())
    started = time.monotonic()
    issued = _issue(client, _provider(cloudflare), dns_server, domains)
    elapsed = time.monotonic() - started
    print(
        f"\none issuance (2 names, Pebble + loopback DNS + Cloudflare emulator): "
        f"{elapsed:.3f} s; steps: " + ", ".join(f"{k}={v:.3f}" for k, v in issued.timings.items())
    )
    sans = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(domains)
    assert issued.fullchain_pem.count("BEGIN CERTIFICATE") == 1 + len(issued.chain) >= 2
    assert "PRIVATE KEY" in issued.key_pem.reveal()
    assert "PRIVATE KEY" not in repr(issued)
    _verify(issued, _roots(pebble.roots_pem), domains[0])
    # negative control: the same chain does not verify to another root
    with pytest.raises(VerificationError):
        _verify(issued, _roots(pebble.https_ca_path.read_text()), domains[0])
    # validity of the fixture's single profile: 90 days
    lifetime = issued.leaf.not_valid_after_utc - issued.leaf.not_valid_before_utc
    assert abs(lifetime.total_seconds() - LETSENCRYPT_PROFILES["default"]) < 5
    for key in ("order", "propagation", "validation", "finalize", "total"):
        assert issued.timings[key] >= 0
    # Pebble really asked our DNS server for the challenge names (over TCP)
    asked = {(n, t) for n, t, _ in dns_server.queries()[queries_before:]}
    assert (f"_acme-challenge.{domains[0]}", "TXT") in asked
    # nothing left behind, neither in DNS nor in the API
    assert _challenge_records(dns_store, domains) == []
    assert not [r for r in cloudflare.api.records() if r["name"].endswith(domains[0])]


def test_account_is_found_again_not_registered_twice(
    pebble: PebbleServer, dns_server: DnsServer, cloudflare: CloudflareSetup, tmp_path: Path
) -> None:
    key_file = tmp_path / "account.pem"
    first = open_account(
        pebble.directory_url, AccountKey.from_file(key_file), None, pebble.ca_bundle
    )
    assert first.registered_new_account
    assert key_file.stat().st_mode & 0o777 == 0o600
    second = open_account(
        pebble.directory_url, AccountKey.from_file(key_file), None, pebble.ca_bundle
    )
    assert not second.registered_new_account
    assert second.account_uri == first.account_uri
    for acme in (first, second):
        _issue(acme, _provider(cloudflare), dns_server, (unique_domain(),))
    # negative control: another key is another account
    other = _client(pebble)
    assert other.registered_new_account
    assert other.account_uri != first.account_uri


@pytest.fixture(scope="module")
def pebble_profiles(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer
) -> Iterator[PebbleServer]:
    with PebbleServer(
        tmp_path_factory.mktemp("pebble-profiles"),
        dns_server.address,
        profiles=LETSENCRYPT_PROFILES,
    ) as server:
        yield server


@pytest.mark.parametrize("profile", ["shortlived", "tlsserver"])
def test_profile_is_requested_and_honoured(
    pebble_profiles: PebbleServer,
    dns_server: DnsServer,
    cloudflare: CloudflareSetup,
    profile: str,
) -> None:
    client = _client(pebble_profiles)
    issued = _issue(client, _provider(cloudflare), dns_server, (unique_domain(),), profile=profile)
    lifetime = issued.leaf.not_valid_after_utc - issued.leaf.not_valid_before_utc
    assert abs(lifetime.total_seconds() - LETSENCRYPT_PROFILES[profile]) < 5
    _verify(issued, _roots(pebble_profiles.roots_pem), _first_name(issued.leaf))


def test_unknown_profile_is_a_clear_error_before_any_order(
    pebble_profiles: PebbleServer,
    dns_server: DnsServer,
    dns_store: RecordStore,
    cloudflare: CloudflareSetup,
) -> None:
    client = _client(pebble_profiles)
    domain = unique_domain()
    with pytest.raises(IssuanceError) as info:
        _issue(client, _provider(cloudflare), dns_server, (domain,), profile="classic")
    message = str(info.value)
    assert "'classic'" in message
    for offered in LETSENCRYPT_PROFILES:
        assert offered in message
    assert _challenge_records(dns_store, (domain,)) == []


def test_replaces_is_accepted_then_already_replaced_is_retried_without_it(
    pebble: PebbleServer,
    dns_server: DnsServer,
    cloudflare: CloudflareSetup,
    client: AcmeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    domain = unique_domain()
    dns = _provider(cloudflare)
    old = _issue(client, dns, dns_server, (domain,))
    old_id = cert_id(old.leaf)
    # ARI: Pebble serves a window for the old certificate; open it, as a test CA can
    assert client.renewal_info_url is not None
    with requests.Session() as session:
        window = fetch_renewal_window(
            session, client.renewal_info_url, old.leaf, verify=str(pebble.ca_bundle)
        )
        now = datetime.datetime.now(UTC)
        assert not window.is_open(now)
        pebble.set_ari_window(
            old.leaf.public_bytes(Encoding.PEM).decode(),
            now - datetime.timedelta(hours=1),
            now + datetime.timedelta(hours=1),
            explanation_url="https://ca.example/why",
        )
        opened = fetch_renewal_window(
            session, client.renewal_info_url, old.leaf, verify=str(pebble.ca_bundle)
        )
    assert opened.is_open(now)
    assert opened.explanation_url == "https://ca.example/why"

    renewed = _issue(client, dns, dns_server, (domain,), replaces=old_id)
    assert renewed.replaced == old_id  # the CA echoed it: accepted
    assert renewed.leaf.serial_number != old.leaf.serial_number

    caplog.clear()
    again = _issue(client, dns, dns_server, (domain,), replaces=old_id)
    assert again.replaced is None
    assert "already replaced" in caplog.text
    # negative control: replacing the newest certificate is still accepted
    newest = _issue(client, dns, dns_server, (domain,), replaces=cert_id(again.leaf))
    assert newest.replaced == cert_id(again.leaf)


class _SplitDns:
    """Test stand-in for a broken DNS setup: the nameserver we poll gets the right value,
    the one the CA asks gets a wrong one. Records in both stores are ours to remove."""

    def __init__(self, polled: RecordStore, ca_side: RecordStore) -> None:
        self.polled = polled
        self.ca_side = ca_side
        self.created: list[str] = []

    def create_txt(self, fqdn: str, value: str) -> TxtRecord:
        self.polled.add(fqdn, "TXT", value)
        self.ca_side.add(fqdn, "TXT", "wrong-" + value)
        self.created.append(fqdn)
        return TxtRecord(fqdn, value, "example.com", None)

    def delete_txt(self, record: TxtRecord) -> None:
        self.polled.remove(record.fqdn, "TXT", record.value)
        self.ca_side.remove(record.fqdn, "TXT", "wrong-" + record.value)

    def list_stale_txt(self, fqdn: str) -> list[TxtRecord]:
        return []


def test_failed_validation_names_identifier_and_removes_txt(
    pebble: PebbleServer,
    dns_server: DnsServer,
    dns_store: RecordStore,
    client: AcmeClient,
) -> None:
    polled_store = RecordStore()
    domain = unique_domain()
    with DnsServer(polled_store, ["example.com"]) as polled:
        dns = _SplitDns(polled_store, dns_store)
        with pytest.raises(IssuanceError) as info:
            issue_certificate(
                IssueRequest("smtp", (domain,), "ecdsa-p256", None, None),
                client,
                dns,
                nameservers=[polled.address],
                propagation_timeout=5,
            )
    message = str(info.value)
    assert domain in message
    assert "urn:ietf:params:acme:error:unauthorized" in message
    assert dns.created == [f"_acme-challenge.{domain}"]
    assert _challenge_records(dns_store, (domain,)) == []
    assert polled_store.names() == []


class _SilentDns(_SplitDns):
    """Publishes nowhere: the propagation wait must give up."""

    def create_txt(self, fqdn: str, value: str) -> TxtRecord:
        self.created.append(fqdn)
        return TxtRecord(fqdn, value, "example.com", None)


def test_record_never_visible_is_a_dns_error(
    pebble: PebbleServer, dns_server: DnsServer, dns_store: RecordStore, client: AcmeClient
) -> None:
    domain = unique_domain()
    dns = _SilentDns(dns_store, dns_store)
    started = time.monotonic()
    with pytest.raises(DnsChallengeError, match=domain):
        _issue(client, dns, dns_server, (domain,), propagation_timeout=0.5)
    assert time.monotonic() - started < 5
    assert dns.created == [f"_acme-challenge.{domain}"]


def test_cloudflare_stale_record_of_an_earlier_run_is_removed_first(
    dns_server: DnsServer, dns_store: RecordStore, cloudflare: CloudflareSetup, client: AcmeClient
) -> None:
    domain = unique_domain()
    fqdn = f"_acme-challenge.{domain}"
    dns = _provider(cloudflare)
    dns.create_txt(fqdn, "left-over-from-a-crash")
    assert dns_store.values(fqdn, "TXT") == ["left-over-from-a-crash"]
    _issue(client, dns, dns_server, (domain,))
    assert dns_store.values(fqdn, "TXT") == []


@pytest.fixture(scope="module")
def pebble_nonces(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer
) -> Iterator[PebbleServer]:
    with PebbleServer(
        tmp_path_factory.mktemp("pebble-nonce"), dns_server.address, nonce_reject=50
    ) as server:
        yield server


def test_half_the_nonces_rejected_still_issues(
    pebble_nonces: PebbleServer, dns_server: DnsServer, cloudflare: CloudflareSetup
) -> None:
    client = _client(pebble_nonces)
    for _ in range(3):
        issued = _issue(client, _provider(cloudflare), dns_server, (unique_domain(),))
        _verify(issued, _roots(pebble_nonces.roots_pem), _first_name(issued.leaf))
    # the retries were needed: the library alone retries once
    assert client.net.bad_nonce_retries >= 3


def test_rsa_key_type(
    dns_server: DnsServer, cloudflare: CloudflareSetup, client: AcmeClient, pebble: PebbleServer
) -> None:
    issued = _issue(
        client, _provider(cloudflare), dns_server, (unique_domain(),), key_type="rsa-2048"
    )
    assert issued.leaf.public_key().key_size == 2048  # type: ignore[union-attr]
