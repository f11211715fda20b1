"""Issue one certificate: ACME order (RFC 8555) answered over DNS-01.

new key -> CSR -> new order (profile, ARI ``replaces``) -> remove our stale TXT records ->
publish every TXT record -> wait until every nameserver serves them -> answer every
challenge -> poll the order -> finalize -> poll -> download. The TXT records this call
created are removed in every case, on failure too.

Speed (issue 6): no fixed sleeps. We poll the order (one request per round whatever the
number of names) from 50 ms up, instead of ``poll_and_finalize``'s 1 s per authorization
round, and wait exactly as long as a ``Retry-After`` asks, bounded by the deadline.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import requests
from acme import challenges, crypto_util, messages
from acme import errors as acme_errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from renewer.acme_client import AcmeClient, describe_problem, translate_acme_error
from renewer.ari import parse_retry_after
from renewer.dns_provider import DnsProvider, TxtRecord, challenge_fqdn, normalize_name
from renewer.errors import ApiError, DnsChallengeError, IssuanceError
from renewer.propagation import wait_for_txt
from renewer.sensitive import Secret

log = logging.getLogger(__name__)
_T = TypeVar("_T")

KEY_TYPES = ("ecdsa-p256", "rsa-2048", "rsa-3072", "rsa-4096")
FIRST_POLL = 0.05  # seconds
MAX_POLL = 1.0
POLL_GROWTH = 1.5
VALIDATION_TIMEOUT = 120.0  # challenges answered -> order ready
FINALIZE_TIMEOUT = 120.0  # finalize -> certificate


@dataclass(frozen=True)
class IssueRequest:
    name: str
    domains: tuple[str, ...]
    key_type: str  # one of KEY_TYPES
    profile: str | None = None
    replaces: str | None = None  # ARI CertID of the certificate being replaced
    key_pem: Secret | None = None  # a key to reuse (DANE); a new one of key_type otherwise


@dataclass(frozen=True)
class IssuedCertificate:
    name: str
    key_pem: Secret
    fullchain_pem: str
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates, leaf excluded
    timings: Mapping[str, float]  # seconds: order, propagation, validation, finalize, total
    replaced: str | None = None  # the CertID the CA accepted in ``replaces``, if any
    warnings: tuple[str, ...] = field(default=())  # e.g. a TXT record left behind


@dataclass
class _Challenge:
    identifier: str
    fqdn: str
    value: str
    challb: messages.ChallengeBody
    response: challenges.ChallengeResponse


def generate_key(key_type: str) -> Secret:
    """A new private key as unencrypted PKCS#8 PEM."""
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type in ("rsa-2048", "rsa-3072", "rsa-4096"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    else:
        raise IssuanceError(f"unknown key_type {key_type!r}; expected one of {KEY_TYPES}")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Secret(pem.decode())


def issue_certificate(
    request: IssueRequest,
    client: AcmeClient,
    dns: DnsProvider,
    *,
    nameservers: Sequence[tuple[str, int]] | None,
    propagation_timeout: float,
    validation_timeout: float = VALIDATION_TIMEOUT,
    finalize_timeout: float = FINALIZE_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> IssuedCertificate:
    """Raises IssuanceError (the CA's problem type and detail, the failed identifier) or
    DnsChallengeError (publishing, seeing or removing TXT records)."""
    started = clock()
    timings: dict[str, float] = {}
    what = f"certificate {request.name} ({', '.join(request.domains)})"
    log.info(
        "Issuing %s, key %s (%s)",
        what,
        request.key_type,
        "reused" if request.key_pem else "new",
    )
    _check_profile(client, request.profile)

    key_pem = request.key_pem or generate_key(request.key_type)
    csr_pem = crypto_util.make_csr(key_pem.reveal().encode(), list(request.domains))
    timings["key"] = clock() - started

    mark = clock()
    orderr = _acme(
        what, "new order", lambda: client.new_order(csr_pem, request.profile, request.replaces)
    )
    replaced = getattr(orderr.body, "replaces", None)
    timings["order"] = clock() - mark
    log.info(
        "Order %s created in %.2f s (%d authorization(s)%s%s)",
        orderr.uri,
        timings["order"],
        len(orderr.authorizations),
        f", profile {orderr.body.profile}" if orderr.body.profile else "",
        f", replaces {replaced}" if replaced else "",
    )
    pending = _dns_challenges(client, orderr, what)

    created: list[TxtRecord] = []
    warnings: list[str] = []
    try:
        if pending:
            _publish(dns, pending, created, timings, clock)
            mark = clock()
            for ch in pending:
                remaining = max(propagation_timeout - (clock() - mark), 0.1)
                wait_for_txt(ch.fqdn, ch.value, nameservers=nameservers, timeout=remaining)
            timings["propagation"] = clock() - mark
            log.info("TXT records visible after %.2f s", timings["propagation"])
            mark = clock()
            for ch in pending:
                try:
                    client.answer_challenge(ch.challb, ch.response)
                except (messages.Error, acme_errors.Error, requests.RequestException) as exc:
                    doing = f"answer challenge for {ch.identifier}"
                    raise translate_acme_error(exc, f"{what}: {doing}") from exc
        else:
            log.info("All authorizations already valid; no DNS work")
        body = _poll(
            client, orderr, what, ("pending",), validation_timeout, clock=clock, sleep=sleep
        )
        if pending:
            timings["validation"] = clock() - mark
            log.info("Challenges validated in %.2f s", timings["validation"])
        if body.status == messages.STATUS_INVALID:
            raise _validation_failure(client, orderr, body, what)
    finally:
        _cleanup(dns, created, warnings)

    mark = clock()
    if body.status == messages.STATUS_READY:
        _acme(what, "finalize", lambda: client.begin_finalization(orderr))
        body = _poll(
            client,
            orderr,
            what,
            ("ready", "processing"),
            finalize_timeout,
            clock=clock,
            sleep=sleep,
        )
    if body.status != messages.STATUS_VALID or body.certificate is None:
        problem = f": {describe_problem(body.error)}" if body.error is not None else ""
        raise IssuanceError(f"{what}: order ended {body.status}{problem}")
    cert_url = str(body.certificate)
    fullchain = _acme(what, "download", lambda: client.download_certificate(cert_url))
    timings["finalize"] = clock() - mark
    try:
        certs = x509.load_pem_x509_certificates(fullchain.encode())
    except ValueError as exc:
        raise IssuanceError(f"{what}: the CA returned an unreadable chain: {exc}") from exc
    timings["total"] = clock() - started
    leaf = certs[0]
    log.info(
        "Issued %s: serial %x, valid until %s, in %.2f s (finalize %.2f s)",
        what,
        leaf.serial_number,
        leaf.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"),
        timings["total"],
        timings["finalize"],
    )
    return IssuedCertificate(
        name=request.name,
        key_pem=key_pem,
        fullchain_pem=fullchain,
        leaf=leaf,
        chain=tuple(certs[1:]),
        timings=timings,
        replaced=replaced,
        warnings=tuple(warnings),
    )


def _check_profile(client: AcmeClient, profile: str | None) -> None:
    if not profile:
        return
    offered = client.profiles
    if profile not in offered:
        listing = ", ".join(sorted(offered)) if offered else "none"
        raise IssuanceError(
            f"ACME profile {profile!r} is not offered by the CA; its directory lists: {listing}"
        )


def _acme(what: str, doing: str, call: Callable[[], _T]) -> _T:
    try:
        return call()
    except (messages.Error, acme_errors.Error, requests.RequestException) as exc:
        raise translate_acme_error(exc, f"{what}: {doing}") from exc


def _dns_challenges(
    client: AcmeClient, orderr: messages.OrderResource, what: str
) -> list[_Challenge]:
    account_key = client.net.key
    found: list[_Challenge] = []
    for authzr in orderr.authorizations:
        identifier = str(authzr.body.identifier.value)
        status = authzr.body.status
        if status == messages.STATUS_VALID:
            log.info("Authorization for %s is already valid", identifier)
            continue
        if status != messages.STATUS_PENDING:
            raise IssuanceError(f"{what}: authorization for {identifier} is {status}")
        for challb in authzr.body.challenges:
            if isinstance(challb.chall, challenges.DNS01):
                response, value = challb.response_and_validation(account_key)
                fqdn = normalize_name(challb.chall.validation_domain_name(identifier))
                found.append(_Challenge(identifier, fqdn, value, challb, response))
                break
        else:
            offered = ", ".join(str(c.chall.typ) for c in authzr.body.challenges)
            raise IssuanceError(
                f"{what}: the CA offers no dns-01 challenge for {identifier} (offers {offered})"
            )
    return found


def _publish(
    dns: DnsProvider,
    pending: list[_Challenge],
    created: list[TxtRecord],
    timings: dict[str, float],
    clock: Callable[[], float],
) -> None:
    mark = clock()
    try:
        for fqdn in dict.fromkeys(ch.fqdn for ch in pending):
            for stale in dns.list_stale_txt(fqdn):
                log.info("Removing stale TXT record %s left by an earlier run", stale.fqdn)
                dns.delete_txt(stale)
        for ch in pending:
            created.append(dns.create_txt(ch.fqdn, ch.value))
    except ApiError as exc:
        raise DnsChallengeError(f"DNS provider: {exc}") from exc
    timings["dns_publish"] = clock() - mark
    log.info("Published %d TXT record(s) in %.2f s", len(created), timings["dns_publish"])


def remove_stale_challenges(dns: DnsProvider, domains: Sequence[str]) -> int:
    """Removes the TXT records an earlier, interrupted run of ours left at the domains'
    ``_acme-challenge`` names; returns how many. A run with nothing due calls this too,
    else a run killed after publishing leaves its record until the next renewal, weeks
    later. Raises ApiError/DnsChallengeError (callers treat it as a warning)."""
    removed = 0
    for fqdn in dict.fromkeys(challenge_fqdn(d) for d in domains):
        for stale in dns.list_stale_txt(fqdn):
            log.info("Removing stale TXT record %s left by an earlier run", stale.fqdn)
            dns.delete_txt(stale)
            removed += 1
    return removed


def _cleanup(dns: DnsProvider, created: list[TxtRecord], warnings: list[str]) -> None:
    """Remove what we created. A failure here is logged, never raised: it must not hide
    the issuance's own error, and a leftover is removed as stale by the next run."""
    for record in created:
        try:
            dns.delete_txt(record)
        except Exception as exc:  # noqa: BLE001 - cleanup must try every record
            message = f"could not remove TXT record {record.fqdn}: {exc}"
            log.error("%s", message)
            warnings.append(message)
    if created:
        log.info("Removed %d TXT record(s)", len(created) - len(warnings))


def _poll(
    client: AcmeClient,
    orderr: messages.OrderResource,
    what: str,
    waiting: tuple[str, ...],
    timeout: float,
    *,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> messages.Order:
    """Fetch the order until its status leaves ``waiting``; honour Retry-After."""
    deadline = clock() + timeout
    delay = FIRST_POLL
    while True:
        body, response = _acme(what, "poll order", lambda: client.fetch_order(orderr.uri))
        if body.status.name not in waiting:
            return body
        remaining = deadline - clock()
        if remaining <= 0:
            raise IssuanceError(f"{what}: order still {body.status} after {timeout:g} s")
        asked = parse_retry_after(
            response.headers.get("Retry-After"), datetime.datetime.now(datetime.UTC)
        )
        sleep(min(asked if asked is not None else delay, remaining))
        delay = min(delay * POLL_GROWTH, MAX_POLL)


def _validation_failure(
    client: AcmeClient, orderr: messages.OrderResource, body: messages.Order, what: str
) -> IssuanceError:
    """Name each failed identifier with the CA's problem (type and detail)."""
    problems: list[str] = []
    for uri in body.authorizations:
        try:
            authzr = client.fetch_authorization(uri)
        except (messages.Error, acme_errors.Error, requests.RequestException):
            continue
        if authzr.body.status == messages.STATUS_VALID:
            continue
        identifier = authzr.body.identifier.value
        errs = [c.error for c in authzr.body.challenges if c.error is not None]
        detail = "; ".join(describe_problem(e) for e in errs) or str(authzr.body.status)
        problems.append(f"{identifier}: {detail}")
    if not problems and body.error is not None:
        problems.append(describe_problem(body.error))
    return IssuanceError(f"{what}: validation failed: {' | '.join(problems) or 'no detail'}")
