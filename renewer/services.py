"""The outside world of one run, built from the settings: the DNS provider, the CA, Fly
and MailPace clients. Production and tests build it the same way; tests only point the
base URLs at loopback emulators.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import requests
from cryptography import x509

from renewer.acme_client import AccountKey, AcmeClient, open_account
from renewer.ari import RenewalInfoError, cert_id, directory_renewal_info_url, fetch_renewal_window
from renewer.config import CertificateConfig, FlyTargetConfig, Settings
from renewer.decide import AriWindow
from renewer.dns_provider import DnsProvider
from renewer.errors import ConfigError
from renewer.issue import IssuedCertificate, IssueRequest, issue_certificate
from renewer.targets import Target

if TYPE_CHECKING:
    from renewer.fly import FlyClient

log = logging.getLogger(__name__)


class Services:
    """Clients for one run. Not shared between runs; closed at the end of the run."""

    def __init__(self, settings: Settings, cwd: Path) -> None:
        self.settings = settings
        self.cwd = cwd
        self._lock = threading.Lock()
        self._account_lock = threading.Lock()
        self._local = threading.local()
        self._account_key: AccountKey | None = None
        self._dns: DnsProvider | None = None
        self._renewal_info: dict[str, str | None] = {}
        self._fly_clients: dict[str, FlyClient] = {}
        self._session = requests.Session()
        self._session.trust_env = False

    def __enter__(self) -> Services:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._session.close()
        for client in self._fly_clients.values():
            client.close()

    # ------------------------------------------------------------------ ACME

    def _ca_bundle(self) -> str | None:
        bundle = self.settings.config.acme.ca_bundle
        return str(self.cwd / bundle) if bundle else None

    def directory_url(self, *, dry_run: bool) -> str:
        acme = self.settings.config.acme
        return (acme.staging_directory or acme.directory) if dry_run else acme.directory

    def account_key(self) -> AccountKey:
        with self._lock:
            if self._account_key is None:
                self._account_key = self._load_account_key()
            return self._account_key

    def _load_account_key(self) -> AccountKey:
        secret = self.settings.secrets.acme_account_key
        if secret is not None:
            return AccountKey.from_pem(secret)
        key_file = self.settings.config.acme.account_key_file
        if key_file is not None:
            return AccountKey.from_file(self.cwd / key_file, create=True)
        log.warning(
            "no ACME_ACCOUNT_KEY and no acme.account_key_file: using a throw-away ACME "
            "account; set one so renewals reuse the account (ARI replaces, rate limits)"
        )
        return AccountKey.generate()

    def acme_client(self, *, dry_run: bool) -> AcmeClient:
        """One client per worker thread: the acme library's nonce pool is not thread-safe."""
        url = self.directory_url(dry_run=dry_run)
        clients: dict[str, AcmeClient] = getattr(self._local, "clients", {})
        self._local.clients = clients
        if url not in clients:
            # Serialised: two threads finding no account would both register one.
            with self._account_lock:
                clients[url] = open_account(
                    url,
                    self.account_key(),
                    self.settings.config.acme.email,
                    self._ca_bundle(),
                )
        return clients[url]

    def renewal_window(self, leaf: x509.Certificate, now: datetime) -> AriWindow | None:
        """The CA's ARI window for a served certificate, or None (no ARI, or it failed)."""
        url = self.directory_url(dry_run=False)
        verify: bool | str = self._ca_bundle() or True
        try:
            with self._lock:
                if url not in self._renewal_info:
                    self._renewal_info[url] = directory_renewal_info_url(
                        self._session, url, verify=verify
                    )
            info_url = self._renewal_info[url]
            if info_url is None:
                return None
            window = fetch_renewal_window(self._session, info_url, leaf, verify=verify, now=now)
        except RenewalInfoError as exc:
            # RFC 9773: a failed ARI check is not fatal; fall back to the expiry rule.
            log.warning("ARI: %s; deciding by expiry instead", exc)
            return None
        log.info(
            "ARI: the CA suggests renewing between %s and %s",
            window.start.strftime("%Y-%m-%d %H:%M"),
            window.end.strftime("%Y-%m-%d %H:%M"),
        )
        return AriWindow(window.start, window.end, window.explanation_url)

    def issue(
        self, cert: CertificateConfig, replaces: x509.Certificate | None, *, dry_run: bool
    ) -> IssuedCertificate:
        acme = self.settings.config.acme
        dns = self.settings.config.dns
        client = self.acme_client(dry_run=dry_run)
        replaces_id = None
        if replaces is not None and self.settings.config.renewal.ari and client.renewal_info_url:
            replaces_id = cert_id(replaces)
        request = IssueRequest(
            name=cert.name,
            domains=cert.domains,
            key_type=cert.key_type,
            profile=acme.profile,
            replaces=replaces_id,
            key_pem=self.settings.secrets.certificate_keys.get(cert.name),
        )
        return issue_certificate(
            request,
            client,
            self.dns_provider(),
            nameservers=dns.nameservers,
            propagation_timeout=dns.propagation_timeout,
        )

    # ------------------------------------------------------------------ DNS

    def dns_provider(self) -> DnsProvider:
        with self._lock:
            if self._dns is None:
                self._dns = self._make_dns_provider()
            return self._dns

    def _make_dns_provider(self) -> DnsProvider:
        dns = self.settings.config.dns
        secrets = self.settings.secrets
        if dns.provider == "rfc2136":
            from renewer.dns_rfc2136 import Rfc2136Dns  # noqa: PLC0415 - only when used

            assert dns.rfc2136 is not None
            return Rfc2136Dns(
                dns.rfc2136.server,
                dns.rfc2136.tsig_name,
                dns.rfc2136.tsig_algorithm,
                secrets.rfc2136_tsig_secret,
            )
        from renewer.dns_cloudflare import CloudflareDns  # noqa: PLC0415 - only when used

        if secrets.cloudflare_api_token is None:
            raise ConfigError(
                "CLOUDFLARE_API_TOKEN", "is required when dns.provider is 'cloudflare'"
            )
        return CloudflareDns(dns.api_base_url, secrets.cloudflare_api_token, dns.zone_ids)

    # ------------------------------------------------------------------ Fly

    def fly_client(self, api_base_url: str) -> FlyClient:
        """One client per Fly API base URL for the whole run."""
        from renewer.fly import FlyClient  # noqa: PLC0415 - only when used

        token = self.settings.secrets.fly_api_token
        if token is None:
            raise ConfigError("FLY_API_TOKEN", "is required when a certificate has a 'fly' target")
        with self._lock:
            client = self._fly_clients.get(api_base_url)
            if client is None:
                client = FlyClient(api_base_url, token)
                self._fly_clients[api_base_url] = client
            return client

    def fly_target(
        self, config: FlyTargetConfig, app_lock: threading.Lock, certificate_name: str
    ) -> Target:
        from renewer.deploy_fly import FlyTarget  # noqa: PLC0415 - only when used

        client = self.fly_client(config.api_base_url)
        return FlyTarget(
            config,
            client,
            app_lock,
            certificate_name=certificate_name,
            smoke_check_seconds=config.smoke_check,
        )

    # ------------------------------------------------------------------ report

    def send_report(self, subject: str, text: str, status: str) -> int | None:
        """Emails the report when ``notify`` is configured; returns the message id."""
        notify = self.settings.config.notify
        if notify is None:
            return None
        from renewer.mailpace import MailPaceClient  # noqa: PLC0415 - only when used

        token = self.settings.secrets.mailpace_token
        if token is None:
            raise ConfigError("MAILPACE_TOKEN", "is required when 'notify' is configured")
        client = MailPaceClient(notify.api_base_url, token)
        return client.send(
            sender=notify.sender,
            to=notify.to,
            subject=subject,
            text=text,
            tags=["cert-renewer", status],
            # One key per report: a retried request cannot send the email twice.
            idempotency_key=str(uuid.uuid4()),
        )

    def ping_heartbeat(self) -> None:
        url = self.settings.config.heartbeat_url
        if not url:
            return
        try:
            response = self._session.get(url, timeout=10)
            response.raise_for_status()
            log.info("heartbeat pinged")
        except requests.RequestException as exc:
            # A missed ping makes the monitor alert, which is the point; do not fail the run.
            log.warning("heartbeat ping failed: %s", type(exc).__name__)


__all__ = ["Services"]
