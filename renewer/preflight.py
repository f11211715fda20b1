"""Pre-flight checks for ``renewer check``: catch next week's failure today.

Endpoints show what is live; these show whether the next renewal could go through: the
DNS provider's token reaches every domain's zone, and the Fly token reaches every
target app. Nothing is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from renewer.dns_provider import challenge_fqdn
from renewer.errors import RenewerError
from renewer.services import Services


@dataclass(frozen=True)
class PreflightResult:
    check: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {
            "check": self.check,
            "status": "ok" if self.ok else "problems",
            "detail": self.detail,
        }


def run_preflight(services: Services) -> list[PreflightResult]:
    config = services.settings.config
    results: list[PreflightResult] = []
    for cert in config.certificates:
        for domain in cert.domains:
            name = challenge_fqdn(domain)
            check = f"dns {config.dns.provider} {name}"
            try:
                # Finding the zone and listing the name's TXT records proves the token
                # reaches the zone; a write is not tried, so nothing changes.
                stale = services.dns_provider().list_stale_txt(name)
            except RenewerError as exc:
                results.append(PreflightResult(check, False, str(exc)))
                continue
            detail = "zone reachable"
            if stale:
                detail += f"; {len(stale)} leftover TXT record(s) of ours, removed by the next run"
            results.append(PreflightResult(check, True, detail))
    for target in (t for c in config.certificates for t in c.targets if t.type == "fly"):
        check = f"fly app {target.name}"
        try:
            app = services.fly_client(target.api_base_url).get_app(target.name)
        except RenewerError as exc:
            results.append(PreflightResult(check, False, str(exc)))
            continue
        if app is None:
            results.append(PreflightResult(check, False, "not found with FLY_API_TOKEN"))
        else:
            results.append(PreflightResult(check, True, f"reachable (status {app.status})"))
    return results
