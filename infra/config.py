"""Stack config (``Pulumi.<stack>.yaml``) read once into frozen dataclasses.

Every check that can fail does so here, before the program declares any resource, with a
``StackConfigError`` that names the full key (``cert-renewer:region``) and what was
expected. The renewal JSON under ``cert-renewer:renewer`` is validated in full by the
renewer's own parser in ``__main__.py``; this module checks only what crosses keys (a
target app that is the renewer's own app) and what the components need from it (the
domains, the Cloudflare zones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import pulumi

__all__ = [
    "SCHEDULES",
    "FlySecrets",
    "StackConfig",
    "StackConfigError",
    "load_stack_config",
]

PROJECT: Final = "cert-renewer"
# fly-api.md 3.3: the Machines API knows exactly these schedules.
SCHEDULES: Final = ("hourly", "daily", "weekly", "monthly")
DEFAULT_FLY_API: Final = "https://api.machines.dev"
DEFAULT_MEMORY_MB: Final = 256

# fly-api.md 7: region codes are three lowercase letters (cdg = Paris).
_REGION = re.compile(r"^[a-z]{3}$")
# fly-api.md 7: app names are lowercase letters, digits and dashes.
_FLY_APP = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_FLY_ORG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]{0,254}$")
_CAA_ISSUER = re.compile(r"^[a-z0-9.-]{1,253}$")


class StackConfigError(pulumi.RunError, ValueError):
    """A stack config key is missing or wrong; ``key`` is the full Pulumi key.

    A ``RunError``: Pulumi prints just the message, without a traceback.
    """

    def __init__(self, key: str, expected: str) -> None:
        self.key = key
        self.expected = expected
        super().__init__(f"{key}: {expected}")


@dataclass(frozen=True)
class FlySecrets:
    """Secret stack values, kept as secret Outputs so they stay encrypted in state."""

    fly_api_token: pulumi.Output[str]
    fly_provision_token: pulumi.Output[str]
    mailpace_token: pulumi.Output[str] | None
    acme_account_key: pulumi.Output[str] | None
    rfc2136_tsig_secret: pulumi.Output[str] | None
    # key_env name -> the private key a certificate reuses (DANE), a secret per variable.
    certificate_keys: Mapping[str, pulumi.Output[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class StackConfig:
    fly_org: str
    app_name: str
    region: str
    schedule: str
    image: str | None
    fly_api_base_url: str
    memory_mb: int
    # The renewal config exactly as written under `cert-renewer:renewer` (plain JSON data).
    renewer: Mapping[str, object]
    dns_provider: str
    domains: tuple[str, ...]
    target_apps: tuple[str, ...]
    # Cloudflare zone name -> zone id (None: looked up by name at deploy time).
    zones: Mapping[str, str | None]
    caa_issuer: str | None
    secrets: FlySecrets


def _key(name: str) -> str:
    return f"{PROJECT}:{name}"


def _text(config: pulumi.Config, name: str, pattern: re.Pattern[str], expected: str) -> str:
    value = config.get(name)
    if value is None or not value.strip():
        raise StackConfigError(_key(name), f"is required ({expected})")
    value = value.strip()
    if not pattern.match(value):
        raise StackConfigError(_key(name), f"expected {expected}, got {value!r}")
    return value


def _optional_text(
    config: pulumi.Config, name: str, pattern: re.Pattern[str], expected: str
) -> str | None:
    value = config.get(name)
    if value is None or not value.strip() or value.strip() == "null":
        return None
    if not pattern.match(value.strip()):
        raise StackConfigError(_key(name), f"expected {expected}, got {value.strip()!r}")
    return value.strip()


def _domain(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise StackConfigError(key, "expected a domain name")
    name = value.strip().rstrip(".").lower()
    labels = name.split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise StackConfigError(key, f"expected a domain name, got {value!r}")
    return name


def _object(config: pulumi.Config, name: str) -> object:
    try:
        return config.get_object(name)
    except Exception as exc:  # pulumi raises ConfigTypeError (a bare Exception subclass)
        raise StackConfigError(_key(name), "expected a YAML/JSON object") from exc


def _renewer_parts(
    raw: Mapping[str, object], app_name: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The domains and Fly target apps of the renewal config, with the cross-key checks."""
    key = _key("renewer")
    certificates = raw.get("certificates")
    if not isinstance(certificates, Sequence) or isinstance(certificates, str) or not certificates:
        raise StackConfigError(f"{key}.certificates", "expected a non-empty list of certificates")
    domains: list[str] = []
    apps: list[str] = []
    for i, cert in enumerate(certificates):
        where = f"{key}.certificates[{i}]"
        if not isinstance(cert, Mapping):
            raise StackConfigError(where, "expected an object")
        names = cert.get("domains")
        if not isinstance(names, Sequence) or isinstance(names, str) or not names:
            raise StackConfigError(f"{where}.domains", "expected a non-empty list of domain names")
        domains.extend(_domain(d, f"{where}.domains[{j}]") for j, d in enumerate(names))
        targets = cert.get("targets", [])
        if not isinstance(targets, Sequence) or isinstance(targets, str):
            raise StackConfigError(f"{where}.targets", "expected a list of targets")
        for j, target in enumerate(targets):
            if isinstance(target, Mapping) and target.get("type") == "fly":
                app = target.get("app")
                if app == app_name:
                    raise StackConfigError(
                        f"{where}.targets[{j}].app",
                        f"{app!r} is the renewer's own app ({_key('appName')}); a target "
                        "must be an SMTP app, or the renewer would restart itself mid-run",
                    )
                if isinstance(app, str):
                    apps.append(app)
    return tuple(dict.fromkeys(domains)), tuple(dict.fromkeys(apps))


def _zones(
    config: pulumi.Config, raw: Mapping[str, object], domains: Sequence[str]
) -> dict[str, str | None]:
    """Zone name -> configured id (or None). Every domain must fall inside one zone."""
    zones: dict[str, str | None] = {}
    dns = raw.get("dns")
    zone_ids = dns.get("zone_ids") if isinstance(dns, Mapping) else None
    if isinstance(zone_ids, Mapping):
        for name, zone_id in zone_ids.items():
            zone = _domain(name, f"{_key('renewer')}.dns.zone_ids")
            zones[zone] = str(zone_id)
    listed = _object(config, "cloudflareZones")
    if listed is not None:
        if not isinstance(listed, list):
            raise StackConfigError(_key("cloudflareZones"), "expected a list of zone names")
        for i, name in enumerate(listed):
            zones.setdefault(_domain(name, f"{_key('cloudflareZones')}[{i}]"), None)
    for domain in domains:
        if not any(domain == z or domain.endswith("." + z) for z in zones):
            # Without a listed zone, assume the registrable domain is the last two labels;
            # list the zone in cloudflareZones for names like example.co.uk.
            zones.setdefault(".".join(domain.split(".")[-2:]), None)
    return zones


def _certificate_keys(
    config: pulumi.Config, raw: Mapping[str, Any]
) -> dict[str, pulumi.Output[str]]:
    """Each certificate's ``key_env`` is a secret stack key of the same name."""
    keys: dict[str, pulumi.Output[str]] = {}
    certificates = raw.get("certificates")
    for i, cert in enumerate(certificates if isinstance(certificates, list) else []):
        name = cert.get("key_env") if isinstance(cert, Mapping) else None
        if not isinstance(name, str) or not name:
            continue
        value = config.get_secret(name)
        if value is None:
            raise StackConfigError(
                _key(name),
                f"is required by renewer.certificates[{i}].key_env: "
                f"pulumi config set --secret {name} < key.pem",
            )
        keys[name] = value
    return keys


def load_stack_config(config: pulumi.Config) -> StackConfig:
    """Reads and checks every key of the stack; raises StackConfigError naming the key."""
    fly_org = _text(config, "flyOrg", _FLY_ORG, "a Fly organization slug")
    app_name = _text(
        config, "appName", _FLY_APP, "a Fly app name: lowercase letters, digits and dashes"
    )
    region = _text(config, "region", _REGION, "a Fly region code of three letters, e.g. 'cdg'")
    schedule = (config.get("schedule") or "weekly").strip()
    if schedule not in SCHEDULES:
        raise StackConfigError(
            _key("schedule"), f"expected one of {', '.join(SCHEDULES)}, got {schedule!r}"
        )
    image = _optional_text(config, "image", _IMAGE, "an image reference such as registry/app:tag")
    api = (config.get("flyApiBaseUrl") or DEFAULT_FLY_API).strip().rstrip("/")
    if not api.startswith(("https://", "http://127.", "http://localhost")):
        raise StackConfigError(_key("flyApiBaseUrl"), f"expected an https URL, got {api!r}")
    try:
        memory_mb = config.get_int("machineMemoryMb") or DEFAULT_MEMORY_MB
    except Exception as exc:  # pulumi's ConfigTypeError
        raise StackConfigError(_key("machineMemoryMb"), "expected an integer") from exc
    if memory_mb < 256 or memory_mb % 256:
        # fly-api.md 3.3: memory_mb comes in multiples of 256.
        raise StackConfigError(
            _key("machineMemoryMb"), f"expected a multiple of 256, got {memory_mb}"
        )

    raw = _object(config, "renewer")
    if not isinstance(raw, Mapping):
        raise StackConfigError(_key("renewer"), "is required: the renewal config object")
    domains, target_apps = _renewer_parts(raw, app_name)
    dns = raw.get("dns")
    provider = dns.get("provider", "cloudflare") if isinstance(dns, Mapping) else "cloudflare"
    zones = _zones(config, raw, domains) if provider == "cloudflare" else {}
    caa_issuer = _optional_text(
        config, "caaIssuer", _CAA_ISSUER, "the CA's CAA domain, e.g. 'letsencrypt.org'"
    )
    if caa_issuer is not None and provider != "cloudflare":
        raise StackConfigError(_key("caaIssuer"), "needs dns.provider 'cloudflare'")

    fly_token = config.get_secret("flyApiToken")
    if fly_token is None:
        raise StackConfigError(
            _key("flyApiToken"),
            "is required: pulumi config set --secret flyApiToken 'FlyV1 fm2_...'",
        )
    provision_token = config.get_secret("flyProvisionToken") or fly_token
    mailpace = config.get_secret("mailpaceToken")
    if raw.get("notify") is not None and mailpace is None:
        raise StackConfigError(
            _key("mailpaceToken"), "is required when the renewal config has 'notify'"
        )
    secrets = FlySecrets(
        fly_api_token=fly_token,
        fly_provision_token=provision_token,
        mailpace_token=mailpace,
        acme_account_key=config.get_secret("acmeAccountKey"),
        rfc2136_tsig_secret=config.get_secret("rfc2136TsigSecret"),
        certificate_keys=_certificate_keys(config, raw),
    )
    return StackConfig(
        fly_org=fly_org,
        app_name=app_name,
        region=region,
        schedule=schedule,
        image=image,
        fly_api_base_url=api,
        memory_mb=memory_mb,
        renewer=raw,
        dns_provider=str(provider),
        domains=domains,
        target_apps=target_apps,
        zones=zones,
        caa_issuer=caa_issuer,
        secrets=secrets,
    )
