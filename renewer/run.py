"""One run of the job: config -> decide -> issue -> validate -> deploy -> verify -> report.

Each certificate runs on its own (``renewal.concurrency`` at a time); a failure in one
marks it failed and the others carry on. Deployments to one Fly app never overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from renewer.assess import assess_certificate, endpoint_reports
from renewer.certs import days_left, dns_names, issuer_text, not_after, serial_hex
from renewer.config import CertificateConfig, DotenvTargetConfig, Settings
from renewer.context import RunContext, RunOptions, make_context
from renewer.decide import decide_renewal
from renewer.deploy_dotenv import DotenvTarget
from renewer.errors import DeployError, RenewerError, StepError
from renewer.issue import remove_stale_challenges
from renewer.keys import tlsa_3_1_1
from renewer.report import CertificateReport, EndpointReport, RunReport
from renewer.services import Services
from renewer.targets import Target, TargetResult
from renewer.validate import ValidatedCertificate, validate_certificate
from renewer.verify import EndpointsNotServingError, VerifyResult, verify_endpoints

__all__ = [
    "RunContext",
    "RunOptions",
    "assess_certificate",
    "endpoint_reports",
    "make_context",
    "renew_certificate",
    "run",
]

log = logging.getLogger(__name__)


def build_targets(ctx: RunContext, cert: CertificateConfig) -> list[Target]:
    targets: list[Target] = []
    for target in cert.targets:
        if isinstance(target, DotenvTargetConfig):
            targets.append(DotenvTarget(target, ctx.services.cwd))
        else:
            lock = ctx.app_locks.setdefault(target.app, threading.Lock())
            targets.append(ctx.services.fly_target(target, lock, cert.name))
    return targets


def deploy_to_targets(
    targets: Sequence[Target], validated: ValidatedCertificate, report: CertificateReport
) -> None:
    """Deploys target by target; stops at the first failure, leaving the rest untouched."""
    for index, target in enumerate(targets):
        try:
            result = target.deploy(validated.material)
        except DeployError as exc:
            report.targets.append(TargetResult(target.type, target.name, "failed", str(exc)))
            for rest in targets[index + 1 :]:
                report.targets.append(
                    TargetResult(
                        rest.type, rest.name, "skipped", "not attempted: an earlier target failed"
                    )
                )
            raise
        log.info("deploy %s %s: %s (%s)", result.type, result.name, result.status, result.detail)
        report.targets.append(result)


def _apply_verify(
    report: CertificateReport, results: Sequence[VerifyResult], now: datetime
) -> None:
    by_endpoint = {str(r.endpoint): r for r in results}
    fresh = []
    for ep in report.endpoints:
        result = by_endpoint.get(ep.endpoint)
        if result is None or result.served is None:
            fresh.append(ep)
            continue
        leaf = result.served.leaf
        fresh.append(
            EndpointReport(
                endpoint=ep.endpoint,
                serial=serial_hex(leaf),
                not_after=not_after(leaf),
                days_left=days_left(leaf, now),
                matches_new=result.matches,
                issuer=issuer_text(leaf),
                names=dns_names(leaf),
                problems=() if result.matches else (result.detail,),
            )
        )
    report.endpoints = fresh


def _remove_stale_challenges(ctx: RunContext, cert: CertificateConfig) -> None:
    """Best effort: a TXT record left by a killed run goes now, not at the next renewal."""
    try:
        removed = remove_stale_challenges(ctx.services.dns_provider(), cert.domains)
    except RenewerError as exc:
        log.warning("could not check for stale _acme-challenge records: %s", exc)
        return
    if removed:
        log.info("removed %d stale _acme-challenge record(s) left by an earlier run", removed)


def renew_certificate(ctx: RunContext, cert: CertificateConfig) -> CertificateReport:
    report = CertificateReport(cert.name)
    threading.current_thread().name = cert.name
    step = "decide"
    try:
        started = time.monotonic()
        states = assess_certificate(ctx, cert)
        report.endpoints = endpoint_reports(states, ctx.now())
        targets = build_targets(ctx, cert)
        problems = [p for t in targets if (p := t.rollout_problem())]
        decision = decide_renewal(
            states,
            force=ctx.options.force,
            target_problems=problems,
            fallback="no endpoints and no dotenv target to check, so it is renewed every run",
        )
        report.reason = decision.reason
        report.timings["decide"] = time.monotonic() - started
        log.info("decide: %s: %s", "renew" if decision.due else "nothing due", decision.reason)
        if not decision.due:
            report.action = "skipped"
            if not ctx.options.dry_run:
                _remove_stale_challenges(ctx, cert)
            return report

        step = "issue"
        started = time.monotonic()
        issued = ctx.services.issue(cert, decision.replaces, dry_run=ctx.options.dry_run)
        report.timings["issue"] = time.monotonic() - started
        report.replaces = issued.replaced
        report.timings.update({f"issue.{k}": v for k, v in issued.timings.items()})

        step = "validate"
        started = time.monotonic()
        validated = validate_certificate(
            issued,
            cert.domains,
            ctx.roots,
            now=ctx.now(),
            use_system_roots=ctx.use_system_roots,
        )
        report.timings["validate"] = time.monotonic() - started
        report.serial = validated.serial
        report.not_after = validated.not_after
        report.fingerprint_sha256 = validated.fingerprint
        report.tlsa_3_1_1 = tlsa_3_1_1(validated.leaf.public_key())
        log.info(
            "validate: serial %s, expires %s, sha256 %s: key, names, chain, dates, serverAuth "
            "and a local STARTTLS handshake all good",
            validated.serial,
            validated.not_after.strftime("%Y-%m-%d"),
            validated.fingerprint,
        )
        if ctx.options.dry_run:
            report.action = "renewed"
            report.reason = f"dry run: issued and validated, not deployed ({decision.reason})"
            report.targets = [TargetResult(t.type, t.name, "skipped", "dry run") for t in targets]
            return report

        step = "deploy"
        started = time.monotonic()
        deploy_to_targets(targets, validated, report)
        report.timings["deploy"] = time.monotonic() - started

        step = "verify"
        started = time.monotonic()
        try:
            results = verify_endpoints(
                cert.endpoints,
                cert.domains[0],
                validated.fingerprint,
                timeout=ctx.options.verify_timeout,
                probe_timeout=ctx.options.probe_timeout,
            )
        except EndpointsNotServingError as exc:
            _apply_verify(report, exc.results, ctx.now())
            raise
        _apply_verify(report, results, ctx.now())
        report.timings["verify"] = time.monotonic() - started
        report.action = "renewed"
    except StepError as exc:
        failed_step = step if exc.step in ("api", "run") else exc.step
        log.error("%s failed: %s", failed_step, exc)
        report.fail(failed_step, str(exc))
    except RenewerError as exc:
        log.error("%s failed: %s", step, exc)
        report.fail(step, str(exc))
    return report


def run(
    settings: Settings,
    options: RunOptions,
    services: Services,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RunReport:
    """Runs every certificate and returns the report (it never raises for a failed step)."""
    report = RunReport(started_at=now(), dry_run=options.dry_run, forced=options.force)
    config = settings.config
    ctx = make_context(settings, options, services, now)
    workers = max(1, min(config.renewal.concurrency, len(config.certificates)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cert") as pool:
        for cert_report in pool.map(lambda c: renew_certificate(ctx, c), config.certificates):
            report.add(cert_report)
    report.finished_at = now()
    return report
