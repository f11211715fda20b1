"""Whether a certificate is due, judged from what its live endpoints serve. Pure.

Renewal is due (DESIGN.md) when a served certificate lacks a configured name, does not
verify to a trusted root, expires within ``before_days``, or the CA's ARI window has
opened; or when an endpoint cannot be reached and no endpoint shows a good certificate;
or when forced. An unreachable endpoint next to good ones is a problem to report, not a
reason to spend an issuance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from renewer.certs import ChainError, covers, days_left, fingerprint_sha256, verify_chain
from renewer.probe import Endpoint, ServedCertificate


@dataclass(frozen=True)
class AriWindow:
    """The CA's suggested renewal window for one served certificate (RFC 9773)."""

    start: datetime
    end: datetime
    explanation_url: str | None = None


@dataclass(frozen=True)
class EndpointState:
    endpoint: Endpoint | str
    served: ServedCertificate | None
    error: str | None = None
    problems: tuple[str, ...] = ()
    renew_reasons: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate | None:
        return self.served.leaf if self.served else None

    @property
    def good(self) -> bool:
        return self.served is not None and not self.renew_reasons


@dataclass(frozen=True)
class RenewalDecision:
    due: bool
    reason: str
    endpoints: tuple[EndpointState, ...]
    # The served certificate being replaced, named in the order's ARI ``replaces``.
    replaces: x509.Certificate | None = None


def assess_endpoint(
    endpoint: Endpoint | str,
    served: ServedCertificate | None,
    error: str | None,
    *,
    domains: Sequence[str],
    roots: Sequence[x509.Certificate],
    use_system_roots: bool,
    before_days: int,
    now: datetime,
    ari_window: AriWindow | None = None,
) -> EndpointState:
    """Lists what is wrong with one endpoint's certificate and which faults call for renewal."""
    if served is None:
        return EndpointState(endpoint, None, error or "unreachable", (f"unreachable: {error}",))
    leaf = served.leaf
    reasons: list[str] = []
    missing = [d for d in domains if not covers(leaf, d)]
    if missing:
        reasons.append(f"does not cover {', '.join(missing)}")
    # Check trust for a name the certificate does cover, so a missing name is reported
    # once (above) rather than again as a chain failure.
    covered = next((d for d in domains if d not in missing), None)
    trust = _trust_problem(served, roots, use_system_roots=use_system_roots, now=now, name=covered)
    if trust:
        reasons.append(f"not trusted: {trust}")
    left = days_left(leaf, now)
    if left < 0:
        reasons.append(f"expired {-left} day(s) ago")
    elif left <= before_days:
        reasons.append(f"expires in {left} day(s) (renewal.before_days is {before_days})")
    if ari_window is not None and ari_window.start <= now:
        note = f" ({ari_window.explanation_url})" if ari_window.explanation_url else ""
        reasons.append(
            f"the CA's renewal window opened at {ari_window.start:%Y-%m-%d %H:%M}Z{note}"
        )
    return EndpointState(endpoint, served, None, tuple(reasons), tuple(reasons))


def _trust_problem(
    served: ServedCertificate,
    roots: Sequence[x509.Certificate],
    *,
    use_system_roots: bool,
    now: datetime,
    name: str | None,
) -> str | None:
    leaf = served.leaf
    if leaf.issuer == leaf.subject and leaf not in roots:
        return "self-signed (a placeholder or a test certificate)"
    try:
        verify_chain(
            leaf, served.chain, roots, now=now, use_system_roots=use_system_roots, name=name
        )
    except ChainError as exc:
        return str(exc.args[0] if exc.args else exc)
    return None


def decide_renewal(
    states: Sequence[EndpointState],
    *,
    force: bool,
    fallback: str | None = None,
    target_problems: Sequence[str] = (),
) -> RenewalDecision:
    """Turns endpoint states into one decision. ``fallback`` explains a config with no
    endpoints; ``target_problems`` are targets that say a rollout did not finish."""
    states = tuple(states)
    replaces = _certificate_to_replace(states)
    if force:
        return RenewalDecision(True, "forced with --force", states, replaces)
    if target_problems:
        return RenewalDecision(True, "; ".join(target_problems), states, replaces)
    if not states:
        return RenewalDecision(True, fallback or "no endpoint to check", states, None)
    bad = [s for s in states if s.served is not None and s.renew_reasons]
    if bad:
        first = bad[0]
        return RenewalDecision(
            True, f"{first.endpoint}: {'; '.join(first.renew_reasons)}", states, replaces
        )
    if any(s.good for s in states):
        unreachable = [s for s in states if s.served is None]
        reason = "every endpoint serves a good certificate"
        if unreachable:
            reason = (
                f"{len(states) - len(unreachable)} endpoint(s) serve a good certificate; "
                f"{len(unreachable)} unreachable (reported, not renewed for)"
            )
        return RenewalDecision(False, reason, states, None)
    errors = "; ".join(s.error for s in states if s.error)
    return RenewalDecision(
        True,
        f"no endpoint could be reached and none shows a good certificate ({errors})",
        states,
        None,
    )


def _certificate_to_replace(states: Sequence[EndpointState]) -> x509.Certificate | None:
    """The served certificate this run supersedes: the one most endpoints serve, if trusted.

    ARI ``replaces`` only helps for a certificate our CA issued; one that does not verify
    (self-signed placeholder, another CA) is not named.
    """
    counts: dict[str, tuple[int, x509.Certificate]] = {}
    for state in states:
        if state.served is None or any(r.startswith("not trusted") for r in state.renew_reasons):
            continue
        key = fingerprint_sha256(state.served.leaf)
        count, _ = counts.get(key, (0, state.served.leaf))
        counts[key] = (count + 1, state.served.leaf)
    if not counts:
        return None
    return max(counts.values(), key=lambda item: item[0])[1]
