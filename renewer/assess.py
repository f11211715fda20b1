"""Decide's inputs: what every endpoint serves (two connections each), or what a dotenv
target holds, judged per endpoint with the CA's ARI window when enabled."""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from renewer.certs import (
    days_left,
    dns_names,
    fingerprint_sha256,
    issuer_text,
    load_pem_chain,
    not_after,
    serial_hex,
)
from renewer.config import CertificateConfig, DotenvTargetConfig
from renewer.context import RunContext
from renewer.decide import AriWindow, EndpointState, assess_endpoint
from renewer.deploy_dotenv import read_dotenv_values
from renewer.errors import CertificateInvalidError, ProbeError
from renewer.probe import Endpoint, ServedCertificate, probe_endpoint
from renewer.report import EndpointReport

ProbeResult = tuple[Endpoint | str, list[ServedCertificate | ProbeError]]

# A platform proxy spreads connections over an app's machines, so one connection shows
# one machine. Two connections per endpoint catch a rollout that stopped half-way.
PROBE_SAMPLES = 2


def probe_all(
    endpoints: Sequence[Endpoint], sni: str, timeout: float, samples: int = PROBE_SAMPLES
) -> list[ProbeResult]:
    """Probes endpoints in parallel, ``samples`` connections each; each result is a
    ServedCertificate or a ProbeError."""

    def one(endpoint: Endpoint) -> ProbeResult:
        results: list[ServedCertificate | ProbeError] = []
        for _ in range(samples):
            try:
                results.append(probe_endpoint(endpoint, sni, timeout=timeout))
            except ProbeError as exc:
                results.append(exc)
                break  # an unreachable endpoint is not asked twice: it costs a timeout
        return endpoint, results

    if not endpoints:
        return []
    with ThreadPoolExecutor(
        max_workers=min(8, len(endpoints)), thread_name_prefix=threading.current_thread().name
    ) as pool:
        return list(pool.map(one, endpoints))


def assess_certificate(ctx: RunContext, cert: CertificateConfig) -> list[EndpointState]:
    """Probes the certificate's endpoints and judges each, asking the CA's ARI when enabled."""
    now = ctx.now()
    probed = probe_all(cert.endpoints, cert.domains[0], ctx.options.probe_timeout)
    if not cert.endpoints:
        probed = deployed_in_files(cert, ctx.services.cwd)
    served = [r for _, results in probed for r in results if isinstance(r, ServedCertificate)]
    windows = _ari_windows(ctx, served)
    states = []
    for endpoint, results in probed:
        samples = []
        for result in results:
            cert_served = result if isinstance(result, ServedCertificate) else None
            samples.append(
                assess_endpoint(
                    endpoint,
                    cert_served,
                    None if cert_served else str(result),
                    domains=cert.domains,
                    roots=ctx.roots,
                    use_system_roots=ctx.use_system_roots,
                    before_days=ctx.settings.config.renewal.before_days,
                    now=now,
                    ari_window=(
                        windows.get(fingerprint_sha256(cert_served.leaf)) if cert_served else None
                    ),
                )
            )
        states.append(merge_samples(samples))
    return states


def deployed_in_files(cert: CertificateConfig, cwd: Path) -> list[ProbeResult]:
    """Without endpoints, what the dotenv targets hold stands for what is live."""
    results: list[ProbeResult] = []
    for target in cert.targets:
        if not isinstance(target, DotenvTargetConfig):
            continue
        label = f"dotenv {target.path}"
        value = read_dotenv_values(cwd / target.path).get(target.chain_var)
        if not value:
            results.append((label, [ProbeError(f"{label}: holds no {target.chain_var} yet")]))
            continue
        try:
            chain = load_pem_chain(base64.b64decode(value, validate=True))
        except (ValueError, CertificateInvalidError):
            results.append((label, [ProbeError(f"{label}: {target.chain_var} is not a PEM chain")]))
            continue
        results.append((label, [ServedCertificate(label, chain[0], tuple(chain[1:]))]))
    return results


def merge_samples(samples: Sequence[EndpointState]) -> EndpointState:
    """One state per endpoint: the worst sample, plus a reason when samples disagree."""
    worst = max(samples, key=lambda s: (s.served is None, len(s.renew_reasons)))
    prints = {fingerprint_sha256(s.served.leaf) for s in samples if s.served is not None}
    if len(prints) < 2:
        return worst
    reason = (
        f"serves {len(prints)} different certificates on successive connections "
        "(machines disagree: a rollout did not finish?)"
    )
    return replace(
        worst,
        problems=(*worst.problems, reason),
        renew_reasons=(*worst.renew_reasons, reason),
    )


def _ari_windows(ctx: RunContext, served: Sequence[ServedCertificate]) -> dict[str, AriWindow]:
    if not ctx.settings.config.renewal.ari or not served:
        return {}
    windows: dict[str, AriWindow] = {}
    for item in served:
        leaf = item.leaf
        key = fingerprint_sha256(leaf)
        # A self-signed placeholder has no CA to ask; it is renewed on other grounds.
        if key in windows or leaf.issuer == leaf.subject:
            continue
        window = ctx.services.renewal_window(leaf, ctx.now())
        if window is not None:
            windows[key] = window
    return windows


def endpoint_reports(states: Sequence[EndpointState], now: datetime) -> list[EndpointReport]:
    reports = []
    for state in states:
        leaf = state.leaf
        if leaf is None:
            reports.append(EndpointReport(str(state.endpoint), problems=state.problems))
            continue
        reports.append(
            EndpointReport(
                endpoint=str(state.endpoint),
                serial=serial_hex(leaf),
                not_after=not_after(leaf),
                days_left=days_left(leaf, now),
                issuer=issuer_text(leaf),
                names=dns_names(leaf),
                problems=state.problems,
            )
        )
    return reports
