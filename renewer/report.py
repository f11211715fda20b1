"""The run's report: one per run, as JSON (DESIGN.md "Report") and as readable text.

Built only from non-secret facts (names, serials, fingerprints, dates, messages of our
own errors), so nothing here can carry a key or a token.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from renewer.targets import TargetResult

RunStatus = Literal["renewed", "nothing_due", "failed"]
CertificateAction = Literal["renewed", "skipped", "failed"]


def iso_utc(when: datetime | None) -> str | None:
    if when is None:
        return None
    return when.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class EndpointReport:
    endpoint: str
    serial: str | None = None
    not_after: datetime | None = None
    days_left: int | None = None
    matches_new: bool | None = None
    issuer: str | None = None
    names: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def status(self) -> Literal["ok", "problems"]:
        return "problems" if self.problems or self.serial is None else "ok"

    def to_json(self, *, with_status: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "endpoint": self.endpoint,
            "serial": self.serial,
            "not_after": iso_utc(self.not_after),
            "days_left": self.days_left,
            "matches_new": self.matches_new,
        }
        if with_status:
            data.update(
                status=self.status,
                issuer=self.issuer,
                names=list(self.names),
                problems=list(self.problems),
            )
        return data


@dataclass
class CertificateReport:
    name: str
    action: CertificateAction = "skipped"
    reason: str = ""
    serial: str | None = None
    not_after: datetime | None = None
    fingerprint_sha256: str | None = None
    # ARI CertID of the certificate this one replaces, when the CA accepted ``replaces``.
    replaces: str | None = None
    # DANE TLSA 3 1 1 data of the new certificate's key: what a TLSA record must hold.
    tlsa_3_1_1: str | None = None
    targets: list[TargetResult] = field(default_factory=list)
    endpoints: list[EndpointReport] = field(default_factory=list)
    error_step: str | None = None
    error_message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def fail(self, step: str, message: str) -> None:
        self.action = "failed"
        self.error_step = step
        self.error_message = message

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "reason": self.reason,
            "serial": self.serial,
            "not_after": iso_utc(self.not_after),
            "fingerprint_sha256": self.fingerprint_sha256,
            "replaces": self.replaces,
            "tlsa_3_1_1": self.tlsa_3_1_1,
            "targets": [
                {"type": t.type, "name": t.name, "status": t.status, "detail": t.detail}
                for t in self.targets
            ],
            "endpoints": [e.to_json() for e in self.endpoints],
            "error": (
                {"step": self.error_step, "message": self.error_message}
                if self.error_step
                else None
            ),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass
class RunReport:
    started_at: datetime
    dry_run: bool = False
    forced: bool = False
    certificates: list[CertificateReport] = field(default_factory=list)
    error_step: str | None = None
    error_message: str | None = None
    finished_at: datetime | None = None
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, certificate: CertificateReport) -> None:
        with self._lock:
            self.certificates.append(certificate)

    def fail(self, step: str, message: str) -> None:
        """A failure outside any one certificate (config, report sending)."""
        with self._lock:
            if self.error_step is None:
                self.error_step, self.error_message = step, message

    @property
    def status(self) -> RunStatus:
        if self.error_step or any(c.action == "failed" for c in self.certificates):
            return "failed"
        if any(c.action == "renewed" for c in self.certificates):
            return "renewed"
        return "nothing_due"

    @property
    def error(self) -> dict[str, str] | None:
        if self.error_step:
            return {"step": self.error_step, "message": self.error_message or ""}
        for cert in self.certificates:
            if cert.action == "failed" and cert.error_step:
                return {
                    "step": cert.error_step,
                    "message": f"{cert.name}: {cert.error_message or ''}",
                }
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "certificates": [c.to_json() for c in self.certificates],
            "error": self.error,
            "dry_run": self.dry_run,
            "started_at": iso_utc(self.started_at),
            "finished_at": iso_utc(self.finished_at),
        }

    def subject(self) -> str:
        """Outcome first, so a mailbox list view tells the story."""
        names = ", ".join(c.name for c in self.certificates) or "no certificates"
        if self.status == "failed":
            failed = [c.name for c in self.certificates if c.action == "failed"]
            step = (self.error or {}).get("step", "run")
            what = ", ".join(failed) if failed else names
            return f"FAILED: certificate renewal ({what}) at step {step}"
        if self.status == "renewed":
            renewed = [c.name for c in self.certificates if c.action == "renewed"]
            prefix = "Dry run OK" if self.dry_run else "Renewed"
            return f"{prefix}: {', '.join(renewed)}"
        soonest = min(
            (
                e.days_left
                for c in self.certificates
                for e in c.endpoints
                if e.days_left is not None
            ),
            default=None,
        )
        tail = f" (soonest expiry in {soonest} days)" if soonest is not None else ""
        return f"Nothing due: {names}{tail}"

    def render_text(self) -> str:
        lines = [self.subject(), ""]
        if self.status == "failed":
            err = self.error or {}
            lines += [
                f"What failed: step '{err.get('step')}': {err.get('message')}",
                f"What to do: {_advice(err.get('step', ''))}",
                "",
            ]
        for cert in self.certificates:
            lines.append(f"Certificate {cert.name}: {cert.action} - {cert.reason}")
            if cert.serial:
                lines.append(
                    f"  new certificate: serial {cert.serial}, expires {iso_utc(cert.not_after)}, "
                    f"sha256 {cert.fingerprint_sha256}"
                )
                lines.append(f"  DANE TLSA 3 1 1: {cert.tlsa_3_1_1}")
            if cert.error_step:
                lines.append(f"  error at {cert.error_step}: {cert.error_message}")
            for target in cert.targets:
                lines.append(
                    f"  target {target.type} {target.name}: {target.status} ({target.detail})"
                )
            for ep in cert.endpoints:
                if ep.serial is None:
                    lines.append(
                        f"  endpoint {ep.endpoint}: {'; '.join(ep.problems) or 'unreachable'}"
                    )
                    continue
                match = (
                    ""
                    if ep.matches_new is None
                    else (
                        ", serves the new certificate"
                        if ep.matches_new
                        else ", NOT the new certificate"
                    )
                )
                lines.append(
                    f"  endpoint {ep.endpoint}: serial {ep.serial}, {ep.days_left} days left "
                    f"(until {iso_utc(ep.not_after)}){match}"
                )
                lines.extend(f"    problem: {p}" for p in ep.problems)
            if cert.timings:
                parts = ", ".join(f"{k} {v:.2f}s" for k, v in cert.timings.items())
                lines.append(f"  timings: {parts}")
            lines.append("")
        lines.extend(self.notes)
        started = iso_utc(self.started_at)
        finished = iso_utc(self.finished_at)
        lines.append(f"Run started {started}, finished {finished}. Status: {self.status}.")
        return "\n".join(lines).rstrip() + "\n"


def _advice(step: str) -> str:
    return {
        "config": "fix the configuration or environment named above; nothing was changed.",
        "decide": "check that the endpoints are reachable from the renewer; nothing was changed.",
        "issue": (
            "check the DNS provider token and zone, and the CA's message above; nothing was "
            "deployed. The next scheduled run retries."
        ),
        "validate": "the issued certificate was rejected before deployment; nothing was deployed.",
        "deploy": (
            "the app named above was not fully updated; machines after the failing one were "
            "left untouched. Fix the machine, then run `renewer run --force`."
        ),
        "verify": (
            "the certificate was deployed but an endpoint does not serve it yet; check the app "
            "restarted with the new secrets."
        ),
        "report": "the run itself finished; check the MailPace token and sender domain.",
    }.get(step, "read the log of this run.")


def write_json(path: str | None, data: object) -> None:
    """Writes a JSON report for other programs; a path that fails is said on stderr."""
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:  # noqa: PTH123 - str path from the CLI
            handle.write(json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        sys.stderr.write(f"renewer: cannot write the JSON report {path}: {exc.strerror}\n")
