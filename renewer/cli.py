"""The two operator commands behind ``renewer run`` and ``renewer check``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from renewer.assess import assess_certificate, endpoint_reports
from renewer.config import load_settings
from renewer.context import RunOptions, make_context
from renewer.errors import RenewerError
from renewer.preflight import run_preflight
from renewer.report import RunReport, write_json
from renewer.run import run
from renewer.services import Services

log = logging.getLogger(__name__)


def run_renewal(
    config_path: str | None,
    env: Mapping[str, str],
    *,
    force: bool,
    dry_run: bool,
    report_json: str | None,
    cwd: Path | None = None,
) -> int:
    """``renewer run``: returns the exit code. ConfigError propagates (exit 2)."""
    cwd = cwd or Path.cwd()
    settings = load_settings(config_path, env, cwd)
    with Services(settings, cwd) as services:
        # A bad ACME_ACCOUNT_KEY is a configuration error: find it before any network call.
        services.account_key()
        report = run(settings, RunOptions(force=force, dry_run=dry_run), services)
        deliver_report(report, services)
    write_json(str(cwd / report_json) if report_json else None, report.to_json())
    return 1 if report.status == "failed" else 0


def deliver_report(report: RunReport, services: Services) -> None:
    """Prints the report, emails it, pings the heartbeat on success. Never undoes anything."""
    text = report.render_text()
    sys.stdout.write("\n" + text)
    sys.stdout.flush()
    try:
        message_id = services.send_report(report.subject(), text, report.status)
        if message_id is not None:
            log.info("report emailed (MailPace message %s)", message_id)
    except RenewerError as exc:
        # The certificate work stands; the run still fails so the scheduler shows it.
        log.error("the report email could not be sent: %s", exc)
        report.fail("report", f"the report email could not be sent: {exc}")
        sys.stdout.write(f"Report email FAILED: {exc}\n")
    if report.status != "failed":
        services.ping_heartbeat()


def run_check(config_path: str | None, env: Mapping[str, str], report_json: str | None) -> int:
    """``renewer check``: probes every endpoint and prints what it serves; changes nothing."""
    cwd = Path.cwd()
    settings = load_settings(config_path, env, cwd)
    now = datetime.now(UTC)
    problems = 0
    certificates = []
    with Services(settings, cwd) as services:
        ctx = make_context(settings, RunOptions(), services)
        for cert in settings.config.certificates:
            reports = endpoint_reports(assess_certificate(ctx, cert), now)
            sys.stdout.write(f"{cert.name} ({', '.join(cert.domains)})\n")
            for ep in reports:
                if ep.serial is None:
                    sys.stdout.write(f"  {ep.endpoint}: PROBLEM {'; '.join(ep.problems)}\n")
                else:
                    sys.stdout.write(
                        f"  {ep.endpoint}: {ep.status}, names {', '.join(ep.names)}, "
                        f"issuer {ep.issuer}, serial {ep.serial}, {ep.days_left} days left\n"
                    )
                    for problem in ep.problems:
                        sys.stdout.write(f"    problem: {problem}\n")
                problems += ep.status == "problems"
            certificates.append(
                {
                    "name": cert.name,
                    "endpoints": [e.to_json(with_status=True) for e in reports],
                }
            )
        sys.stdout.write("pre-flight (what the next renewal needs)\n")
        preflight = run_preflight(services)
        for result in preflight:
            mark = "ok" if result.ok else "PROBLEM"
            sys.stdout.write(f"  {result.check}: {mark} {result.detail}\n")
            problems += not result.ok
    status = "problems" if problems else "ok"
    write_json(
        report_json,
        {
            "status": status,
            "certificates": certificates,
            "preflight": [r.to_json() for r in preflight],
        },
    )
    sys.stdout.write(f"check: {status} ({problems} problem(s))\n")
    return 1 if problems else 0
