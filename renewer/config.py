"""The renewal configuration: parsed once, validated in full, frozen.

``parse_config`` is pure (no secrets, no network, no Pulumi), so the Pulumi program and
``renewer run`` reject the same mistakes with the same messages. ``load_settings`` adds
the secrets from the environment. Every error is a ``ConfigError`` naming the field
(``certificates[0].targets[1].app``) and what was expected.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

from renewer.errors import ConfigError
from renewer.keys import load_certificate_key
from renewer.probe import Endpoint
from renewer.sensitive import Secret

KeyType = Literal["ecdsa-p256", "rsa-2048", "rsa-3072", "rsa-4096"]
KEY_TYPES: tuple[KeyType, ...] = ("ecdsa-p256", "rsa-2048", "rsa-3072", "rsa-4096")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
FLY_API = "https://api.machines.dev"
MAILPACE_API = "https://app.mailpace.com/api/v1"

# Environment variables that hold secrets; nothing else is read from the environment.
SECRET_VARIABLES = (
    "CLOUDFLARE_API_TOKEN",
    "FLY_API_TOKEN",
    "MAILPACE_TOKEN",
    "ACME_ACCOUNT_KEY",
    "RFC2136_TSIG_SECRET",
)

_MAX_TEXT = 4096
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_FLY_APP = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_CERT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EMAIL = re.compile(r"^[^\s@<>\"',;]+@[^\s@<>\"',;]+\.[^\s@<>\"',;]+$")
_ZONE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETS_ENCRYPT
    email: str | None = None
    ca_bundle: Path | None = None
    profile: str | None = None
    staging_directory: str | None = None
    # Where to keep the account key when ACME_ACCOUNT_KEY is not given (created 0600).
    account_key_file: Path | None = None


@dataclass(frozen=True)
class Rfc2136Settings:
    server: tuple[str, int]
    tsig_name: str | None = None
    tsig_algorithm: str = "hmac-sha256"


@dataclass(frozen=True)
class DnsSettings:
    provider: Literal["cloudflare", "rfc2136"] = "cloudflare"
    api_base_url: str = CLOUDFLARE_API
    zone_ids: Mapping[str, str] = field(default_factory=dict)
    nameservers: tuple[tuple[str, int], ...] = ()
    propagation_timeout: float = 180.0
    rfc2136: Rfc2136Settings | None = None


@dataclass(frozen=True)
class RenewalPolicy:
    before_days: int = 30
    ari: bool = True
    concurrency: int = 4


@dataclass(frozen=True)
class FlyTargetConfig:
    app: str
    key_secret: str = "PRIVATEKEY"  # noqa: S105 - a variable name, not a secret
    chain_secret: str = "FULLCHAIN"  # noqa: S105 - a variable name, not a secret
    api_base_url: str = FLY_API
    wait_timeout: float = 300.0
    # flyctl watches a restarted machine for 10 s to catch a crash loop (fly-api.md 4.4).
    smoke_check: float = 10.0
    type: Literal["fly"] = "fly"

    @property
    def name(self) -> str:
        return self.app


@dataclass(frozen=True)
class DotenvTargetConfig:
    path: Path
    key_var: str = "PRIVATEKEY"
    chain_var: str = "FULLCHAIN"
    reload_command: tuple[str, ...] | None = None
    type: Literal["dotenv"] = "dotenv"

    @property
    def name(self) -> str:
        return str(self.path)


TargetConfig = FlyTargetConfig | DotenvTargetConfig


@dataclass(frozen=True)
class CertificateConfig:
    name: str
    domains: tuple[str, ...]
    key_type: KeyType = "ecdsa-p256"
    endpoints: tuple[Endpoint, ...] = ()
    targets: tuple[TargetConfig, ...] = ()
    # Environment variable holding a private key every renewal reuses (DANE TLSA 3 1 1).
    key_env: str | None = None


@dataclass(frozen=True)
class NotifyConfig:
    sender: str
    to: tuple[str, ...]
    api_base_url: str = MAILPACE_API
    type: Literal["mailpace"] = "mailpace"


@dataclass(frozen=True)
class RenewerConfig:
    certificates: tuple[CertificateConfig, ...]
    acme: AcmeSettings = AcmeSettings()
    dns: DnsSettings = DnsSettings()
    renewal: RenewalPolicy = RenewalPolicy()
    notify: NotifyConfig | None = None
    heartbeat_url: str | None = None

    @property
    def fly_apps(self) -> tuple[str, ...]:
        apps = [t.app for c in self.certificates for t in c.targets if t.type == "fly"]
        return tuple(dict.fromkeys(apps))


@dataclass(frozen=True)
class Secrets:
    cloudflare_api_token: Secret | None = None
    fly_api_token: Secret | None = None
    mailpace_token: Secret | None = None
    acme_account_key: Secret | None = None
    rfc2136_tsig_secret: Secret | None = None
    # Certificate name -> the private key to reuse (PKCS#8 PEM), from ``key_env``.
    certificate_keys: Mapping[str, Secret] = field(default_factory=dict)

    def all_values(self) -> tuple[str, ...]:
        """Every secret's raw value, for leak scanning in tests and redaction."""
        values: tuple[Secret | None, ...] = (
            self.cloudflare_api_token,
            self.fly_api_token,
            self.mailpace_token,
            self.acme_account_key,
            self.rfc2136_tsig_secret,
            *self.certificate_keys.values(),
        )
        return tuple(v.reveal() for v in values if v)


@dataclass(frozen=True)
class Settings:
    config: RenewerConfig
    secrets: Secrets


# --------------------------------------------------------------------------- helpers


class _Reader:
    """Reads one JSON object, rejecting unknown keys so a typo never passes silently."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(where or "config", "expected a JSON object")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str) -> object:
        self.used.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise ConfigError(self.path(key), "is required")
            return default
        return _text(value, self.path(key))

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.path(key), f"expected a whole number from {lo} to {hi}")
        if not lo <= value <= hi:
            raise ConfigError(
                self.path(key), f"expected a whole number from {lo} to {hi}, got {value}"
            )
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.path(key), f"expected a number of seconds from {lo:g} to {hi:g}")
        if not lo <= value <= hi:
            raise ConfigError(
                self.path(key), f"expected a number of seconds from {lo:g} to {hi:g}, got {value}"
            )
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(self.path(key), "expected true or false")
        return value

    def array(self, key: str) -> list[object]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(self.path(key), "expected a JSON array")
        return value

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise ConfigError(self.path(unknown[0]), f"unknown key (known keys here: {known})")


def _text(value: object, where: str, *, max_len: int = _MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise ConfigError(where, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ConfigError(where, "must not be empty")
    if len(value) > max_len:
        raise ConfigError(where, f"is too long ({len(value)} characters, at most {max_len})")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ConfigError(where, "must not contain control characters (newlines, tabs, ...)")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_url(value: str | None, where: str) -> str:
    assert value is not None
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ConfigError(where, f"expected an https:// URL, got {value!r}") from None
    if parts.scheme == "https" and host:
        return value.rstrip("/")
    if parts.scheme == "http" and _is_loopback(host):
        return value.rstrip("/")
    raise ConfigError(
        where, f"expected an https:// URL (http:// only for loopback test servers), got {value!r}"
    )


def _domain(value: object, where: str) -> str:
    text = _text(value, where, max_len=253).strip()
    if text != value:
        raise ConfigError(where, "must not have leading or trailing spaces")
    name = text.lower().rstrip(".")
    wildcard = name.startswith("*.")
    body = name[2:] if wildcard else name
    try:
        ascii_name = body.encode("idna").decode("ascii") if not body.isascii() else body
    except UnicodeError:
        raise ConfigError(where, f"{text!r} is not a valid domain name") from None
    labels = ascii_name.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(
            where,
            f"{text!r} is not a valid domain name (expected letters, digits and dashes "
            "in dot-separated labels, e.g. smtp.example.com)",
        )
    if labels[-1].isdigit():
        raise ConfigError(where, f"{text!r} looks like an IP address; expected a domain name")
    return ("*." if wildcard else "") + ascii_name


def _env_name(value: str | None, where: str) -> str:
    assert value is not None
    if not _ENV_NAME.match(value):
        raise ConfigError(where, f"expected a variable name like PRIVATEKEY, got {value!r}")
    return value


def _host_port(value: object, where: str, default_port: int) -> tuple[str, int]:
    text = _text(value, where, max_len=300)
    host, _, port_text = (
        text.rpartition(":")
        if text.count(":") == 1 or "]" in text
        else (
            text,
            "",
            "",
        )
    )
    if not host:
        host, port_text = text, ""
    host = host.strip("[]")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(where, f"expected host:port, got {text!r}") from None
    if not 0 < port < 65536 or not _valid_host(host):
        raise ConfigError(where, f"expected host:port (an IP address or a host name), got {text!r}")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.lower().rstrip(".").split(".")
    return bool(host) and len(host) <= 253 and all(_LABEL.match(label) for label in labels)


# --------------------------------------------------------------------------- sections


def _parse_acme(data: object) -> AcmeSettings:
    r = _Reader({} if data is None else data, "acme")
    directory = _api_url(r.text("directory", LETS_ENCRYPT), r.path("directory"))
    staging = r.text("staging_directory")
    email = r.text("email")
    if email is not None and not _EMAIL.match(email):
        raise ConfigError(r.path("email"), f"expected an email address, got {email!r}")
    bundle = r.text("ca_bundle")
    profile = r.text("profile")
    if profile is not None and not re.match(r"^[A-Za-z0-9_.-]{1,64}$", profile):
        raise ConfigError(
            r.path("profile"), f"expected a profile name like tlsserver, got {profile!r}"
        )
    key_file = r.text("account_key_file")
    r.finish()
    return AcmeSettings(
        directory=directory,
        email=email,
        ca_bundle=Path(bundle) if bundle else None,
        profile=profile,
        staging_directory=_api_url(staging, r.path("staging_directory")) if staging else None,
        account_key_file=Path(key_file) if key_file else None,
    )


def _parse_dns(data: object) -> DnsSettings:
    r = _Reader({} if data is None else data, "dns")
    provider = r.text("provider", "cloudflare")
    if provider not in ("cloudflare", "rfc2136"):
        raise ConfigError(
            r.path("provider"), f"expected 'cloudflare' or 'rfc2136', got {provider!r}"
        )
    api = _api_url(r.text("api_base_url", CLOUDFLARE_API), r.path("api_base_url"))
    zone_raw = r.raw("zone_ids") or {}
    if not isinstance(zone_raw, Mapping):
        raise ConfigError(r.path("zone_ids"), "expected an object of zone name -> zone id")
    zone_ids: dict[str, str] = {}
    for zone, zone_id in zone_raw.items():
        where = f"{r.path('zone_ids')}.{zone}"
        zone_name = _domain(zone, where)
        zone_ids[zone_name] = _text(zone_id, where, max_len=64)
        if not _ZONE_ID.match(zone_ids[zone_name]):
            raise ConfigError(where, "expected a Cloudflare zone id (letters and digits)")
    nameservers = tuple(
        _host_port(ns, f"{r.path('nameservers')}[{i}]", 53)
        for i, ns in enumerate(r.array("nameservers"))
    )
    timeout = r.number("propagation_timeout", 180.0, 1, 3600)
    rfc2136: Rfc2136Settings | None = None
    server = r.raw("server")
    tsig_name = r.text("tsig_name")
    tsig_algorithm = r.text("tsig_algorithm", "hmac-sha256")
    assert tsig_algorithm is not None
    if provider == "rfc2136":
        if server is None:
            raise ConfigError(
                r.path("server"), "is required when provider is 'rfc2136' (host:port)"
            )
        if tsig_algorithm.lower() not in TSIG_ALGORITHMS:
            raise ConfigError(
                r.path("tsig_algorithm"), f"expected one of {', '.join(TSIG_ALGORITHMS)}"
            )
        if tsig_name is not None:
            _domain(tsig_name if "." in tsig_name else tsig_name + ".key", r.path("tsig_name"))
        rfc2136 = Rfc2136Settings(
            server=_host_port(server, r.path("server"), 53),
            tsig_name=tsig_name,
            tsig_algorithm=tsig_algorithm.lower(),
        )
    elif server is not None:
        raise ConfigError(r.path("server"), "is only used when provider is 'rfc2136'")
    elif tsig_name is not None:
        raise ConfigError(r.path("tsig_name"), "is only used when provider is 'rfc2136'")
    r.finish()
    return DnsSettings(
        provider=cast(Literal["cloudflare", "rfc2136"], provider),
        api_base_url=api,
        zone_ids=zone_ids,
        nameservers=nameservers,
        propagation_timeout=timeout,
        rfc2136=rfc2136,
    )


def _parse_renewal(data: object) -> RenewalPolicy:
    r = _Reader({} if data is None else data, "renewal")
    policy = RenewalPolicy(
        before_days=r.integer("before_days", 30, 1, 365),
        ari=r.boolean("ari", True),
        concurrency=r.integer("concurrency", 4, 1, 64),
    )
    r.finish()
    return policy


def _parse_target(data: object, where: str, seen_paths: set[Path]) -> TargetConfig:
    r = _Reader(data, where)
    kind = r.text("type", required=True)
    if kind == "fly":
        app = r.text("app", required=True)
        assert app is not None
        if not _FLY_APP.match(app):
            raise ConfigError(
                r.path("app"),
                f"expected a Fly app name (lowercase letters, digits, dashes), got {app!r}",
            )
        fly = FlyTargetConfig(
            app=app,
            key_secret=_env_name(r.text("key_secret", "PRIVATEKEY"), r.path("key_secret")),
            chain_secret=_env_name(r.text("chain_secret", "FULLCHAIN"), r.path("chain_secret")),
            api_base_url=_api_url(r.text("api_base_url", FLY_API), r.path("api_base_url")),
            wait_timeout=r.number("wait_timeout", 300.0, 1, 3600),
            smoke_check=r.number("smoke_check", 10.0, 0, 300),
        )
        if fly.key_secret == fly.chain_secret:
            raise ConfigError(r.path("chain_secret"), "must differ from key_secret")
        target: TargetConfig = fly
    elif kind == "dotenv":
        path_text = r.text("path", required=True)
        assert path_text is not None
        path = Path(path_text)
        if path.name in ("", ".", "..") or path.is_absolute() or ".." in path.parts:
            # The file holds a private key: keep it inside the working directory, where
            # the operator put the config, rather than anywhere a typo could point.
            raise ConfigError(
                r.path("path"),
                f"expected a relative file path inside the working directory, got {path_text!r}",
            )
        if path in seen_paths:
            raise ConfigError(r.path("path"), f"{path_text!r} is already a target")
        seen_paths.add(path)
        reload_raw = r.raw("reload_command")
        reload_command: tuple[str, ...] | None = None
        if reload_raw is not None:
            if not isinstance(reload_raw, list) or not reload_raw:
                raise ConfigError(
                    r.path("reload_command"),
                    'expected a non-empty list of arguments, e.g. ["systemctl", "reload", "smtp"] '
                    "(no shell: a string is not accepted)",
                )
            reload_command = tuple(
                _text(arg, f"{r.path('reload_command')}[{i}]") for i, arg in enumerate(reload_raw)
            )
        dotenv = DotenvTargetConfig(
            path=path,
            key_var=_env_name(r.text("key_var", "PRIVATEKEY"), r.path("key_var")),
            chain_var=_env_name(r.text("chain_var", "FULLCHAIN"), r.path("chain_var")),
            reload_command=reload_command,
        )
        if dotenv.key_var == dotenv.chain_var:
            raise ConfigError(r.path("chain_var"), "must differ from key_var")
        target = dotenv
    else:
        raise ConfigError(r.path("type"), f"expected 'fly' or 'dotenv', got {kind!r}")
    r.finish()
    return target


def _parse_certificate(
    data: object, where: str, seen_domains: dict[str, str], seen_paths: set[Path]
) -> CertificateConfig:
    r = _Reader(data, where)
    name = r.text("name", required=True)
    assert name is not None
    if not _CERT_NAME.match(name):
        raise ConfigError(
            r.path("name"), f"expected letters, digits, '.', '_' or '-' (at most 64), got {name!r}"
        )
    domains_raw = r.array("domains")
    if not domains_raw:
        raise ConfigError(r.path("domains"), "expected at least one domain name")
    if len(domains_raw) > 100:
        raise ConfigError(r.path("domains"), "at most 100 names fit in one certificate")
    domains: list[str] = []
    for i, raw in enumerate(domains_raw):
        domain = _domain(raw, f"{r.path('domains')}[{i}]")
        if domain in seen_domains:
            raise ConfigError(
                f"{r.path('domains')}[{i}]",
                f"{domain!r} is listed twice (also in {seen_domains[domain]})",
            )
        seen_domains[domain] = f"{r.path('domains')}[{i}]"
        domains.append(domain)
    key_env = r.text("key_env")
    if key_env is not None and (
        not _ENV_NAME.match(key_env) or key_env in SECRET_VARIABLES or key_env == "RENEWER_CONFIG"
    ):
        raise ConfigError(
            r.path("key_env"),
            f"expected the name of an environment variable of its own, like "
            f"SMTP_TLS_KEY, got {key_env!r}",
        )
    key_type = r.text("key_type", "ecdsa-p256")
    if key_type not in KEY_TYPES:
        raise ConfigError(
            r.path("key_type"), f"expected one of {', '.join(KEY_TYPES)}, got {key_type!r}"
        )
    endpoints = []
    for i, raw in enumerate(r.array("endpoints")):
        where_ep = f"{r.path('endpoints')}[{i}]"
        endpoints.append(Endpoint.parse(_text(raw, where_ep, max_len=300), field=where_ep))
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(r.path("endpoints"), "lists the same endpoint twice")
    targets = tuple(
        _parse_target(t, f"{r.path('targets')}[{i}]", seen_paths)
        for i, t in enumerate(r.array("targets"))
    )
    fly_apps = [t.app for t in targets if isinstance(t, FlyTargetConfig)]
    if len(set(fly_apps)) != len(fly_apps):
        raise ConfigError(r.path("targets"), "lists the same Fly app twice")
    r.finish()
    return CertificateConfig(
        name=name,
        domains=tuple(domains),
        key_type=key_type,
        endpoints=tuple(endpoints),
        targets=targets,
        key_env=key_env,
    )


def _parse_notify(data: object) -> NotifyConfig | None:
    if data is None:
        return None
    r = _Reader(data, "notify")
    kind = r.text("type", "mailpace")
    if kind != "mailpace":
        raise ConfigError(r.path("type"), f"expected 'mailpace', got {kind!r}")
    sender = r.text("from", required=True)
    assert sender is not None
    bare = sender.rsplit("<", 1)[-1].rstrip(">").strip()
    if not _EMAIL.match(bare):
        raise ConfigError(
            r.path("from"), f"expected an email address or 'Name <addr>', got {sender!r}"
        )
    to_raw = r.raw("to")
    to_list = to_raw if isinstance(to_raw, list) else [to_raw] if to_raw is not None else []
    if not to_list:
        raise ConfigError(r.path("to"), "expected an email address or a list of them")
    to: list[str] = []
    for i, addr in enumerate(to_list):
        where = f"{r.path('to')}[{i}]" if isinstance(to_raw, list) else r.path("to")
        text = _text(addr, where)
        for part in (p.strip() for p in text.split(",")):
            if not _EMAIL.match(part):
                raise ConfigError(where, f"expected email addresses, got {part!r}")
            to.append(part)
    if len(to) > 50:
        raise ConfigError(r.path("to"), "MailPace accepts at most 50 recipients")
    api = _api_url(r.text("api_base_url", MAILPACE_API), r.path("api_base_url"))
    r.finish()
    return NotifyConfig(sender=sender, to=tuple(to), api_base_url=api)


def parse_config(data: object) -> RenewerConfig:
    """Validates the whole renewal config (DESIGN.md "Contract"); raises ConfigError."""
    r = _Reader(data, "")
    acme = _parse_acme(r.raw("acme"))
    dns = _parse_dns(r.raw("dns"))
    renewal = _parse_renewal(r.raw("renewal"))
    certificates_raw = r.array("certificates")
    if not certificates_raw:
        raise ConfigError("certificates", "expected at least one certificate")
    seen_domains: dict[str, str] = {}
    seen_paths: set[Path] = set()
    certificates = tuple(
        _parse_certificate(c, f"certificates[{i}]", seen_domains, seen_paths)
        for i, c in enumerate(certificates_raw)
    )
    names = [c.name for c in certificates]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"certificates[{i}].name", f"{name!r} is used by two certificates")
    notify = _parse_notify(r.raw("notify"))
    heartbeat = r.text("heartbeat_url")
    r.finish()
    return RenewerConfig(
        certificates=certificates,
        acme=acme,
        dns=dns,
        renewal=renewal,
        notify=notify,
        heartbeat_url=_api_url(heartbeat, "heartbeat_url") if heartbeat else None,
    )


def load_secrets(config: RenewerConfig, env: Mapping[str, str]) -> Secrets:
    """Takes the secrets the config needs from the environment; a missing one is exit 2."""

    def get(name: str) -> Secret | None:
        value = env.get(name, "").strip()
        if name != "ACME_ACCOUNT_KEY" and any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            # A token with a newline would break the HTTP header; say so now, not mid-run.
            raise ConfigError(name, "must be one line without control characters (newlines)")
        return Secret(value) if value else None

    certificate_keys: dict[str, Secret] = {}
    for i, cert in enumerate(config.certificates):
        if cert.key_env is None:
            continue
        value = env.get(cert.key_env, "").strip()
        if not value:
            raise ConfigError(cert.key_env, f"is required by certificates[{i}].key_env")
        certificate_keys[cert.name] = load_certificate_key(
            Secret(value), cert.key_env, cert.key_type
        )
    secrets = Secrets(
        cloudflare_api_token=get("CLOUDFLARE_API_TOKEN"),
        fly_api_token=get("FLY_API_TOKEN"),
        mailpace_token=get("MAILPACE_TOKEN"),
        acme_account_key=get("ACME_ACCOUNT_KEY"),
        rfc2136_tsig_secret=get("RFC2136_TSIG_SECRET"),
        certificate_keys=certificate_keys,
    )
    if config.dns.provider == "cloudflare" and secrets.cloudflare_api_token is None:
        raise ConfigError("CLOUDFLARE_API_TOKEN", "is required when dns.provider is 'cloudflare'")
    rfc = config.dns.rfc2136
    if rfc is not None and rfc.tsig_name and secrets.rfc2136_tsig_secret is None:
        raise ConfigError("RFC2136_TSIG_SECRET", "is required when dns.tsig_name is set")
    if secrets.rfc2136_tsig_secret is not None:
        try:
            base64.b64decode(secrets.rfc2136_tsig_secret.reveal(), validate=True)
        except ValueError:
            raise ConfigError(
                "RFC2136_TSIG_SECRET", "expected the base64 secret as BIND prints it"
            ) from None
    if config.fly_apps and secrets.fly_api_token is None:
        raise ConfigError("FLY_API_TOKEN", "is required when a certificate has a 'fly' target")
    if config.notify is not None and secrets.mailpace_token is None:
        raise ConfigError("MAILPACE_TOKEN", "is required when 'notify' is configured")
    return secrets


def read_config_source(config_path: str | None, env: Mapping[str, str]) -> object:
    """Reads the JSON from --config FILE, else from RENEWER_CONFIG."""
    if config_path:
        where = "--config"
        try:
            text = Path(config_path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {config_path!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("--config", f"{config_path!r} is not UTF-8 text") from None
    elif env.get("RENEWER_CONFIG", "").strip():
        where = "RENEWER_CONFIG"
        text = env["RENEWER_CONFIG"]
    else:
        raise ConfigError("--config", "give --config FILE or set RENEWER_CONFIG to the JSON config")
    if len(text) > 1_000_000:
        raise ConfigError(where, "is larger than 1 MB; expected a small JSON document")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            where, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{where}: {exc.key}", "is given twice; keep one") from None
    except RecursionError:
        raise ConfigError(where, "is nested too deeply to be a renewer config") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits
        raise ConfigError(where, f"is not a usable JSON document ({exc})") from None


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's default keeps the last of two equal keys; a repeated section is a mistake."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def check_local_paths(config: RenewerConfig, cwd: Path) -> None:
    """Filesystem checks that a pure parse cannot make: no dotenv target through a symlink."""
    for i, cert in enumerate(config.certificates):
        for j, target in enumerate(cert.targets):
            if not isinstance(target, DotenvTargetConfig):
                continue
            where = f"certificates[{i}].targets[{j}].path"
            current = cwd
            for part in target.path.parts:
                current = current / part
                if current.is_symlink():
                    raise ConfigError(
                        where, f"{str(target.path)!r} goes through a symlink; expected a plain file"
                    )
            if not (cwd / target.path).parent.is_dir():
                raise ConfigError(where, f"the folder of {str(target.path)!r} does not exist")
    bundle = config.acme.ca_bundle
    if bundle is not None and not (cwd / bundle).is_file():
        raise ConfigError("acme.ca_bundle", f"{str(bundle)!r} is not a readable file")


def load_settings(
    config_path: str | None, env: Mapping[str, str], cwd: Path | None = None
) -> Settings:
    config = parse_config(read_config_source(config_path, env))
    check_local_paths(config, cwd or Path.cwd())
    return Settings(config=config, secrets=load_secrets(config, env))


__all__: Sequence[str] = (
    "KEY_TYPES",
    "AcmeSettings",
    "CertificateConfig",
    "DnsSettings",
    "DotenvTargetConfig",
    "FlyTargetConfig",
    "NotifyConfig",
    "RenewalPolicy",
    "RenewerConfig",
    "Rfc2136Settings",
    "Secrets",
    "Settings",
    "TargetConfig",
    "check_local_paths",
    "load_secrets",
    "load_settings",
    "parse_config",
    "read_config_source",
)
