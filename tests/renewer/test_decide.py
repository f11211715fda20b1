"""renewer.decide with real certificates: a trustme CA is the trusted root.

DESIGN.md "Precise meanings": renewal is due when a served certificate lacks a configured
name, does not verify to a trusted root, expires within ``before_days``, or the ARI
window has opened; or when an endpoint cannot be reached and no endpoint shows a good
certificate. Each case has a negative control next to it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from renewer.certs import load_pem_chain
from renewer.decide import (
    AriWindow,
    EndpointState,
    RenewalDecision,
    assess_endpoint,
    decide_renewal,
)
from renewer.probe import Endpoint, ServedCertificate

NOW = datetime.now(UTC).replace(microsecond=0)
DOMAINS = ("smtp.example.com", "mx.example.com")
EP1 = Endpoint.parse("smtp.example.com:587")
EP2 = Endpoint.parse("smtp.example.com:465")
EP3 = Endpoint.parse("127.0.0.1:25")


@pytest.fixture(scope="module")
def root_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def issuing_ca(root_ca: trustme.CA) -> trustme.CA:
    return root_ca.create_child_ca()


@pytest.fixture(scope="module")
def roots(root_ca: trustme.CA) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(root_ca.cert_pem.bytes())]


def _issue(
    ca: trustme.CA,
    *names: str,
    valid_from: timedelta = timedelta(days=-1),
    valid_for: timedelta = timedelta(days=60),
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
    leaf = ca.issue_cert(
        *(names or DOMAINS), not_before=NOW + valid_from, not_after=NOW + valid_for
    )
    chain = load_pem_chain(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return chain[0], tuple(chain[1:])


def _self_signed(*names: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )


def _served(
    endpoint: Endpoint, leaf: x509.Certificate, chain: tuple[x509.Certificate, ...] = ()
) -> ServedCertificate:
    return ServedCertificate(endpoint, leaf, chain)


def _assess(
    served: ServedCertificate | None,
    roots: list[x509.Certificate],
    *,
    endpoint: Endpoint = EP1,
    error: str | None = None,
    domains: tuple[str, ...] = DOMAINS,
    before_days: int = 30,
    ari_window: AriWindow | None = None,
) -> EndpointState:
    return assess_endpoint(
        endpoint,
        served,
        error,
        domains=domains,
        roots=roots,
        use_system_roots=False,
        before_days=before_days,
        now=NOW,
        ari_window=ari_window,
    )


def _decide(*states: EndpointState, force: bool = False) -> RenewalDecision:
    return decide_renewal(states, force=force)


# --------------------------------------------------------------------- one endpoint


def test_good_certificate_is_not_due(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    leaf, chain = _issue(issuing_ca)
    state = _assess(_served(EP1, leaf, chain), roots)
    assert state.renew_reasons == ()
    assert state.problems == ()
    assert state.good
    decision = _decide(state)
    assert not decision.due
    assert decision.reason == "every endpoint serves a good certificate"
    assert decision.replaces is None
    assert decision.endpoints == (state,)


def test_missing_name_is_due(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    leaf, chain = _issue(issuing_ca, "smtp.example.com")
    decision = _decide(_assess(_served(EP1, leaf, chain), roots))
    assert decision.due
    assert "does not cover mx.example.com" in decision.reason
    assert str(EP1) in decision.reason
    # Negative control: the same certificate is good for the one name it has.
    control = _assess(_served(EP1, leaf, chain), roots, domains=("smtp.example.com",))
    assert not _decide(control).due


def test_wildcard_covers_a_name_but_not_the_bare_domain(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    leaf, chain = _issue(issuing_ca, "*.example.com")
    good = _assess(_served(EP1, leaf, chain), roots, domains=("smtp.example.com",))
    assert not _decide(good).due
    bare = _assess(_served(EP1, leaf, chain), roots, domains=("example.com",))
    assert _decide(bare).due
    assert "does not cover example.com" in _decide(bare).reason


def test_self_signed_is_due(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    leaf = _self_signed(*DOMAINS)
    decision = _decide(_assess(_served(EP1, leaf), roots))
    assert decision.due
    assert "not trusted" in decision.reason
    # Negative control: trust is the only fault (names present, a year left), and a
    # certificate from the trusted CA with the same names is good.
    state = _assess(_served(EP1, leaf), roots)
    assert [r.split(":")[0] for r in state.renew_reasons] == ["not trusted"]
    good, chain = _issue(issuing_ca, *DOMAINS, valid_for=timedelta(days=365))
    assert not _decide(_assess(_served(EP1, good, chain), roots)).due


def test_certificate_from_another_ca_is_due(roots: list[x509.Certificate]) -> None:
    other = trustme.CA()
    leaf, chain = _issue(other)
    decision = _decide(_assess(_served(EP1, leaf, chain), roots))
    assert decision.due
    assert "not trusted" in decision.reason
    assert "no path to a trusted root" in decision.reason
    other_root = x509.load_pem_x509_certificate(other.cert_pem.bytes())
    assert not _decide(_assess(_served(EP1, leaf, chain), [other_root])).due


def test_missing_intermediate_is_due(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    leaf, chain = _issue(issuing_ca)
    assert chain, "the test needs an intermediate"
    decision = _decide(_assess(_served(EP1, leaf, ()), roots))
    assert decision.due
    assert "not trusted" in decision.reason


def test_expired_is_due(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    leaf, chain = _issue(
        issuing_ca, valid_from=timedelta(days=-90), valid_for=timedelta(days=-2, hours=-1)
    )
    state = _assess(_served(EP1, leaf, chain), roots)
    decision = _decide(state)
    assert decision.due
    assert any("expired 3 day(s) ago" in r for r in state.renew_reasons), state.renew_reasons


@pytest.mark.parametrize(
    ("valid_for", "before_days", "due"),
    [
        (timedelta(days=10, hours=1), 30, True),
        (timedelta(days=10, hours=1), 10, True),  # 10 days left, 10 before: due (<=)
        (timedelta(days=10, hours=1), 9, False),
        (timedelta(days=31, hours=1), 30, False),
        (timedelta(days=30, hours=23), 30, True),  # 30.9 days: floor is 30
    ],
)
def test_expiry_within_before_days(
    issuing_ca: trustme.CA,
    roots: list[x509.Certificate],
    valid_for: timedelta,
    before_days: int,
    due: bool,
) -> None:
    leaf, chain = _issue(issuing_ca, valid_for=valid_for)
    state = _assess(_served(EP1, leaf, chain), roots, before_days=before_days)
    decision = _decide(state)
    assert decision.due is due
    if due:
        days = valid_for.days
        assert f"expires in {days} day(s) (renewal.before_days is {before_days})" in (
            decision.reason
        )


def test_ari_window_opened_is_due(issuing_ca: trustme.CA, roots: list[x509.Certificate]) -> None:
    leaf, chain = _issue(issuing_ca)
    window = AriWindow(
        NOW - timedelta(hours=1), NOW + timedelta(days=1), "https://ca.example/incident/42"
    )
    decision = _decide(_assess(_served(EP1, leaf, chain), roots, ari_window=window))
    assert decision.due
    assert "renewal window opened" in decision.reason
    assert "https://ca.example/incident/42" in decision.reason
    assert decision.replaces == leaf
    # The window opening exactly now counts as open.
    at_now = AriWindow(NOW, NOW + timedelta(days=1))
    assert _decide(_assess(_served(EP1, leaf, chain), roots, ari_window=at_now)).due


def test_ari_window_not_yet_open_is_not_due(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    leaf, chain = _issue(issuing_ca)
    window = AriWindow(NOW + timedelta(seconds=1), NOW + timedelta(days=2))
    decision = _decide(_assess(_served(EP1, leaf, chain), roots, ari_window=window))
    assert not decision.due
    assert decision.replaces is None


# --------------------------------------------------------------------- several endpoints


def test_unreachable_next_to_a_good_endpoint_is_reported_not_renewed(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    leaf, chain = _issue(issuing_ca)
    good = _assess(_served(EP1, leaf, chain), roots)
    down = _assess(None, roots, endpoint=EP2, error="smtp.example.com:465: connection refused")
    assert down.problems == ("unreachable: smtp.example.com:465: connection refused",)
    assert down.renew_reasons == ()
    assert not down.good
    decision = _decide(good, down)
    assert not decision.due
    assert "1 endpoint(s) serve a good certificate" in decision.reason
    assert "1 unreachable" in decision.reason
    assert decision.endpoints == (good, down)


def test_all_unreachable_is_due(roots: list[x509.Certificate]) -> None:
    states = [
        _assess(None, roots, endpoint=ep, error=f"{ep}: no answer within 10s") for ep in (EP1, EP2)
    ]
    decision = _decide(*states)
    assert decision.due
    assert "no endpoint could be reached" in decision.reason
    assert decision.replaces is None


def test_unreachable_next_to_a_bad_endpoint_is_due(roots: list[x509.Certificate]) -> None:
    down = _assess(None, roots, endpoint=EP2, error="refused")
    bad = _assess(_served(EP1, _self_signed(*DOMAINS)), roots)
    decision = _decide(down, bad)
    assert decision.due
    assert decision.reason.startswith(f"{EP1}: not trusted")


def test_one_bad_endpoint_among_good_ones_is_due(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    leaf, chain = _issue(issuing_ca)
    old, old_chain = _issue(issuing_ca, valid_for=timedelta(days=3, hours=1))
    good = _assess(_served(EP1, leaf, chain), roots)
    stale = _assess(_served(EP2, old, old_chain), roots, endpoint=EP2)
    decision = _decide(good, stale)
    assert decision.due
    assert decision.reason.startswith(f"{EP2}: expires in 3 day(s)")


def test_force_is_due_even_when_everything_is_good(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    leaf, chain = _issue(issuing_ca)
    state = _assess(_served(EP1, leaf, chain), roots)
    assert not _decide(state).due  # negative control
    forced = _decide(state, force=True)
    assert forced.due
    assert forced.reason == "forced with --force"
    assert forced.replaces == leaf


def test_no_endpoints_is_due_with_the_fallback_reason() -> None:
    decision = decide_renewal((), force=False, fallback="no endpoints configured for smtp")
    assert decision.due
    assert decision.reason == "no endpoints configured for smtp"


# --------------------------------------------------------------------- ARI replaces


def test_replaces_is_the_served_trusted_certificate(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    leaf, chain = _issue(issuing_ca, valid_for=timedelta(days=5))
    decision = _decide(_assess(_served(EP1, leaf, chain), roots))
    assert decision.due
    assert decision.replaces == leaf


def test_replaces_never_names_an_untrusted_certificate(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    placeholder = _self_signed(*DOMAINS)
    ours, chain = _issue(issuing_ca, valid_for=timedelta(days=5))
    # The placeholder is on more endpoints than ours, and is listed first.
    states = [
        _assess(_served(EP1, placeholder), roots, endpoint=EP1),
        _assess(_served(EP3, placeholder), roots, endpoint=EP3),
        _assess(_served(EP2, ours, chain), roots, endpoint=EP2),
    ]
    decision = _decide(*states)
    assert decision.due
    assert decision.replaces == ours
    assert _decide(*states, force=True).replaces == ours


def test_replaces_is_none_when_nothing_served_is_trusted(roots: list[x509.Certificate]) -> None:
    other = trustme.CA()
    foreign, chain = _issue(other)
    states = [
        _assess(_served(EP1, _self_signed(*DOMAINS)), roots),
        _assess(_served(EP2, foreign, chain), roots, endpoint=EP2),
        _assess(None, roots, endpoint=EP3, error="refused"),
    ]
    decision = _decide(*states)
    assert decision.due
    assert decision.replaces is None
    assert _decide(*states, force=True).replaces is None


def test_replaces_prefers_the_certificate_most_endpoints_serve(
    issuing_ca: trustme.CA, roots: list[x509.Certificate]
) -> None:
    first, first_chain = _issue(issuing_ca, valid_for=timedelta(days=5))
    second, second_chain = _issue(issuing_ca, valid_for=timedelta(days=6))
    states = [
        _assess(_served(EP1, first, first_chain), roots, endpoint=EP1),
        _assess(_served(EP2, second, second_chain), roots, endpoint=EP2),
        _assess(_served(EP3, second, second_chain), roots, endpoint=EP3),
    ]
    assert _decide(*states).replaces == second
