"""renewer.config: the whole renewal config, parsed up front into frozen objects.

DESIGN.md "Contract" fixes the fields and defaults; issue 5 ("Bad input") asks that every
bad configuration or environment fails with a message naming the field. Each bad case
below asserts the exact field path and a fragment of what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from renewer.config import (
    CLOUDFLARE_API,
    FLY_API,
    LETS_ENCRYPT,
    MAILPACE_API,
    AcmeSettings,
    CertificateConfig,
    DnsSettings,
    DotenvTargetConfig,
    FlyTargetConfig,
    NotifyConfig,
    RenewalPolicy,
    RenewerConfig,
    Secrets,
    check_local_paths,
    load_secrets,
    load_settings,
    parse_config,
    read_config_source,
)
from renewer.errors import ConfigError
from renewer.probe import Endpoint
from renewer.sensitive import Secret

# The example of DESIGN.md "Contract", verbatim apart from the comments.
DESIGN_EXAMPLE: dict[str, Any] = {
    "acme": {
        "directory": "https://acme-v02.api.letsencrypt.org/directory",
        "email": None,
        "ca_bundle": None,
        "profile": None,
    },
    "dns": {
        "provider": "cloudflare",
        "api_base_url": "https://api.cloudflare.com/client/v4",
        "zone_ids": {},
        "nameservers": [],
        "propagation_timeout": 180,
    },
    "renewal": {"before_days": 30, "ari": True, "concurrency": 4},
    "certificates": [
        {
            "name": "smtp",
            "domains": ["smtp.example.com", "smtp.example.net"],
            "key_type": "ecdsa-p256",
            "endpoints": ["smtp.example.com:587", "smtp.example.com:465"],
            "targets": [
                {
                    "type": "fly",
                    "app": "example-smtp",
                    "key_secret": "PRIVATEKEY",
                    "chain_secret": "FULLCHAIN",
                    "api_base_url": "https://api.machines.dev",
                    "wait_timeout": 300,
                },
                {
                    "type": "dotenv",
                    "path": "smtp.env",
                    "key_var": "PRIVATEKEY",
                    "chain_var": "FULLCHAIN",
                    "reload_command": None,
                },
            ],
        }
    ],
    "notify": {
        "type": "mailpace",
        "from": "certs@example.com",
        "to": "ops@example.com",
        "api_base_url": "https://app.mailpace.com/api/v1",
    },
}

# The smallest valid config: every section left to its default.
MINIMAL: dict[str, Any] = {
    "certificates": [{"name": "smtp", "domains": ["smtp.example.com"]}],
}

# A base for the bad cases: two targets, so paths like targets[1] exist.
BASE: dict[str, Any] = {
    "certificates": [
        {
            "name": "smtp",
            "domains": ["smtp.example.com", "mx.example.com"],
            "endpoints": ["smtp.example.com:587"],
            "targets": [
                {"type": "fly", "app": "example-smtp"},
                {"type": "dotenv", "path": "smtp.env"},
            ],
        }
    ],
}

ENV_ALL = {
    "CLOUDFLARE_API_TOKEN": "cf-token-value-1234",
    "FLY_API_TOKEN": "FlyV1 fm2_abcdef",
    "MAILPACE_TOKEN": "mailpace-token-5678",
    "RFC2136_TSIG_SECRET": "c2VjcmV0LXRzaWcta2V5LWJ5dGVz",
}

Key = str | int
Patch = Callable[[dict[str, Any]], None]


def _set(path: tuple[Key, ...], value: object) -> Patch:
    """A patch that sets ``value`` at ``path`` (creating missing dict levels)."""

    def patch(config: dict[str, Any]) -> None:
        node: Any = config
        for key in path[:-1]:
            if isinstance(key, str) and key not in node:
                node[key] = {}
            node = node[key]
        node[path[-1]] = value

    return patch


def _append(path: tuple[Key, ...], value: object) -> Patch:
    def patch(config: dict[str, Any]) -> None:
        node: Any = config
        for key in path:
            node = node[key]
        node.append(value)

    return patch


def _delete(path: tuple[Key, ...]) -> Patch:
    def patch(config: dict[str, Any]) -> None:
        node: Any = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return patch


def _both(*patches: Patch) -> Patch:
    def patch(config: dict[str, Any]) -> None:
        for one in patches:
            one(config)

    return patch


def _patched(patch: Patch, base: dict[str, Any] = BASE) -> dict[str, Any]:
    config = copy.deepcopy(base)
    patch(config)
    return config


C0 = ("certificates", 0)
T0 = (*C0, "targets", 0)  # the fly target of BASE
T1 = (*C0, "targets", 1)  # the dotenv target of BASE
SECOND_CERT = {"name": "other", "domains": ["other.example.com"]}
NOTIFY = {"from": "certs@example.com", "to": "ops@example.com"}
RFC2136 = {"provider": "rfc2136", "server": "127.0.0.1:5353"}

# (id, patch of BASE, the exact field, a fragment of the message)
BAD_CONFIGS: list[tuple[str, Patch, str, str]] = [
    # --- structure and unknown keys
    ("top-level-unknown-key", _set(("certificate",), []), "certificate", "unknown key"),
    (
        "acme-unknown-key",
        _set(("acme", "directroy"), "https://x.example"),
        "acme.directroy",
        "unknown key",
    ),
    (
        "target-unknown-key",
        _set((*T1, "reload"), ["true"]),
        "certificates[0].targets[1].reload",
        "unknown key",
    ),
    ("certificates-empty", _set(("certificates",), []), "certificates", "at least one certificate"),
    (
        "certificates-missing",
        _delete(("certificates",)),
        "certificates",
        "at least one certificate",
    ),
    (
        "certificates-object",
        _set(("certificates",), {"smtp": {}}),
        "certificates",
        "expected a JSON array",
    ),
    (
        "certificate-null",
        _set(("certificates",), [None]),
        "certificates[0]",
        "expected a JSON object",
    ),
    ("dns-not-object", _set(("dns",), ["cloudflare"]), "dns", "expected a JSON object"),
    ("notify-not-object", _set(("notify",), "ops@example.com"), "notify", "expected a JSON object"),
    # --- certificate names: spaces, newlines, shell metacharacters, huge, duplicates
    ("name-space", _set((*C0, "name"), "my cert"), "certificates[0].name", "letters, digits"),
    (
        "name-newline",
        _set((*C0, "name"), "smtp\nX-Injected: 1"),
        "certificates[0].name",
        "control characters",
    ),
    ("name-shell", _set((*C0, "name"), "smtp;rm -rf /"), "certificates[0].name", "letters, digits"),
    ("name-subshell", _set((*C0, "name"), "$(reboot)"), "certificates[0].name", "letters, digits"),
    ("name-backtick", _set((*C0, "name"), "smtp`id`"), "certificates[0].name", "letters, digits"),
    ("name-huge", _set((*C0, "name"), "a" * 100_000), "certificates[0].name", "too long"),
    ("name-missing", _delete((*C0, "name")), "certificates[0].name", "is required"),
    ("name-number", _set((*C0, "name"), 7), "certificates[0].name", "expected a string"),
    (
        "name-duplicate",
        _append(("certificates",), {"name": "smtp", "domains": ["other.example.com"]}),
        "certificates[1].name",
        "used by two certificates",
    ),
    # --- domains: hostile, IDN, wildcard, duplicates, huge
    (
        "domains-missing",
        _delete((*C0, "domains")),
        "certificates[0].domains",
        "at least one domain",
    ),
    (
        "domains-string",
        _set((*C0, "domains"), "smtp.example.com"),
        "certificates[0].domains",
        "expected a JSON array",
    ),
    (
        "domain-space",
        _set((*C0, "domains", 1), "mx example.com"),
        "certificates[0].domains[1]",
        "not a valid domain name",
    ),
    (
        "domain-leading-space",
        _set((*C0, "domains", 1), " mx.example.com"),
        "certificates[0].domains[1]",
        "leading or trailing spaces",
    ),
    (
        "domain-newline",
        _set((*C0, "domains", 1), "mx.example.com\nevil.example"),
        "certificates[0].domains[1]",
        "control characters",
    ),
    (
        "domain-shell",
        _set((*C0, "domains", 1), "mx.example.com;id"),
        "certificates[0].domains[1]",
        "not a valid domain name",
    ),
    (
        "domain-single-label",
        _set((*C0, "domains", 0), "localhost"),
        "certificates[0].domains[0]",
        "not a valid domain name",
    ),
    (
        "domain-ip",
        _set((*C0, "domains", 0), "192.0.2.25"),
        "certificates[0].domains[0]",
        "looks like an IP address",
    ),
    (
        "domain-label-too-long",
        _set((*C0, "domains", 0), "a" * 64 + ".example.com"),
        "certificates[0].domains[0]",
        "not a valid domain name",
    ),
    (
        "domain-huge",
        _set((*C0, "domains", 0), "a." * 5000 + "com"),
        "certificates[0].domains[0]",
        "too long",
    ),
    (
        "domains-too-many",
        _set((*C0, "domains"), [f"h{i}.example.com" for i in range(101)]),
        "certificates[0].domains",
        "at most 100",
    ),
    (
        "domain-wildcard-middle",
        _set((*C0, "domains", 0), "smtp.*.example.com"),
        "certificates[0].domains[0]",
        "not a valid domain name",
    ),
    (
        "domain-wildcard-double",
        _set((*C0, "domains", 0), "*.*.example.com"),
        "certificates[0].domains[0]",
        "not a valid domain name",
    ),
    (
        "domain-wildcard-tld",
        _set((*C0, "domains", 0), "*.com"),
        "certificates[0].domains[0]",
        "not a valid domain name",
    ),
    (
        "domain-duplicate",
        _set((*C0, "domains", 1), "smtp.example.com"),
        "certificates[0].domains[1]",
        "listed twice",
    ),
    (
        "domain-duplicate-case-dot",
        _set((*C0, "domains", 1), "SMTP.Example.COM."),
        "certificates[0].domains[1]",
        "listed twice",
    ),
    (
        "domain-duplicate-idn-punycode",
        _set((*C0, "domains"), ["bücher.example.com", "xn--bcher-kva.example.com"]),
        "certificates[0].domains[1]",
        "listed twice",
    ),
    (
        "domain-duplicate-across-certificates",
        _append(("certificates",), {"name": "other", "domains": ["mx.example.com"]}),
        "certificates[1].domains[0]",
        "also in certificates[0].domains[1]",
    ),
    (
        "domain-idn-invalid",
        _set((*C0, "domains", 0), "bü cher.example.com"),
        "certificates[0].domains[0]",
        "not a valid domain name",
    ),
    (
        "key-type",
        _set((*C0, "key_type"), "rsa-1024"),
        "certificates[0].key_type",
        "expected one of ecdsa-p256",
    ),
    # --- endpoints
    (
        "endpoint-no-port",
        _set((*C0, "endpoints", 0), "smtp.example.com"),
        "certificates[0].endpoints[0]",
        "the port is required",
    ),
    (
        "endpoint-space",
        _set((*C0, "endpoints", 0), "smtp example.com:587"),
        "certificates[0].endpoints[0]",
        "not a valid host name",
    ),
    (
        "endpoint-newline",
        _set((*C0, "endpoints", 0), "smtp.example.com:587\n"),
        "certificates[0].endpoints[0]",
        "control characters",
    ),
    (
        "endpoint-shell",
        _set((*C0, "endpoints", 0), "$(id).example.com:587"),
        "certificates[0].endpoints[0]",
        "not a valid host name",
    ),
    (
        "endpoint-port-range",
        _set((*C0, "endpoints", 0), "smtp.example.com:70000"),
        "certificates[0].endpoints[0]",
        "1-65535",
    ),
    (
        "endpoint-mode",
        _set((*C0, "endpoints", 0), "smtp.example.com:587/ssl"),
        "certificates[0].endpoints[0]",
        "unknown mode",
    ),
    (
        "endpoint-idn-unicode",
        _set((*C0, "endpoints", 0), "bücher.example.com:587"),
        "certificates[0].endpoints[0]",
        "xn--",
    ),
    (
        "endpoint-duplicate",
        _append((*C0, "endpoints"), "SMTP.example.com:587/starttls"),
        "certificates[0].endpoints",
        "same endpoint twice",
    ),
    # --- targets
    (
        "target-type-unknown",
        _set((*T0, "type"), "k8s"),
        "certificates[0].targets[0].type",
        "expected 'fly' or 'dotenv'",
    ),
    (
        "target-type-missing",
        _delete((*T1, "type")),
        "certificates[0].targets[1].type",
        "is required",
    ),
    (
        "targets-not-list",
        _set((*C0, "targets"), {"type": "fly"}),
        "certificates[0].targets",
        "expected a JSON array",
    ),
    (
        "fly-app-space",
        _set((*T0, "app"), "example smtp"),
        "certificates[0].targets[0].app",
        "Fly app name",
    ),
    (
        "fly-app-shell",
        _set((*T0, "app"), "smtp&&curl"),
        "certificates[0].targets[0].app",
        "Fly app name",
    ),
    ("fly-app-missing", _delete((*T0, "app")), "certificates[0].targets[0].app", "is required"),
    (
        "fly-app-duplicate",
        _append((*C0, "targets"), {"type": "fly", "app": "example-smtp"}),
        "certificates[0].targets",
        "same Fly app twice",
    ),
    (
        "fly-secret-name-equals",
        _set((*T0, "key_secret"), "PRIVATE=KEY"),
        "certificates[0].targets[0].key_secret",
        "variable name",
    ),
    (
        "fly-secrets-same",
        _set((*T0, "chain_secret"), "PRIVATEKEY"),
        "certificates[0].targets[0].chain_secret",
        "must differ",
    ),
    (
        "fly-url-http",
        _set((*T0, "api_base_url"), "http://api.machines.dev"),
        "certificates[0].targets[0].api_base_url",
        "https://",
    ),
    (
        "fly-wait-timeout-bool",
        _set((*T0, "wait_timeout"), True),
        "certificates[0].targets[0].wait_timeout",
        "number of seconds",
    ),
    (
        "fly-wait-timeout-huge",
        _set((*T0, "wait_timeout"), 10**12),
        "certificates[0].targets[0].wait_timeout",
        "from 1 to 3600",
    ),
    (
        "dotenv-path-absolute",
        _set((*T1, "path"), "/etc/smtp.env"),
        "certificates[0].targets[1].path",
        "inside the working directory",
    ),
    (
        "dotenv-path-parent",
        _set((*T1, "path"), "../smtp.env"),
        "certificates[0].targets[1].path",
        "inside the working directory",
    ),
    (
        "dotenv-path-sneaky-parent",
        _set((*T1, "path"), "conf/../../smtp.env"),
        "certificates[0].targets[1].path",
        "inside the working directory",
    ),
    (
        "dotenv-path-dot",
        _set((*T1, "path"), "."),
        "certificates[0].targets[1].path",
        "relative file path",
    ),
    (
        "dotenv-path-newline",
        _set((*T1, "path"), "smtp.env\n"),
        "certificates[0].targets[1].path",
        "control characters",
    ),
    (
        "dotenv-path-huge",
        _set((*T1, "path"), "a" * 5000),
        "certificates[0].targets[1].path",
        "too long",
    ),
    (
        "dotenv-path-duplicate",
        _append(
            ("certificates",),
            {
                "name": "b",
                "domains": ["b.example.com"],
                "targets": [{"type": "dotenv", "path": "./smtp.env"}],
            },
        ),
        "certificates[1].targets[0].path",
        "already a target",
    ),
    (
        "reload-command-string",
        _set((*T1, "reload_command"), "systemctl reload smtp"),
        "certificates[0].targets[1].reload_command",
        "list of arguments",
    ),
    (
        "reload-command-object",
        _set((*T1, "reload_command"), {"cmd": "x"}),
        "certificates[0].targets[1].reload_command",
        "list of arguments",
    ),
    (
        "reload-command-empty",
        _set((*T1, "reload_command"), []),
        "certificates[0].targets[1].reload_command",
        "non-empty list",
    ),
    (
        "reload-command-non-string-arg",
        _set((*T1, "reload_command"), ["kill", "-HUP", 1]),
        "certificates[0].targets[1].reload_command[2]",
        "expected a string",
    ),
    (
        "reload-command-empty-arg",
        _set((*T1, "reload_command"), ["true", ""]),
        "certificates[0].targets[1].reload_command[1]",
        "must not be empty",
    ),
    (
        "reload-command-newline-arg",
        _set((*T1, "reload_command"), ["sh", "x\nrm -rf /"]),
        "certificates[0].targets[1].reload_command[1]",
        "control characters",
    ),
    (
        "dotenv-var-space",
        _set((*T1, "key_var"), "PRIVATE KEY"),
        "certificates[0].targets[1].key_var",
        "variable name",
    ),
    (
        "dotenv-var-shell",
        _set((*T1, "chain_var"), "FULLCHAIN;id"),
        "certificates[0].targets[1].chain_var",
        "variable name",
    ),
    (
        "dotenv-vars-same",
        _set((*T1, "chain_var"), "PRIVATEKEY"),
        "certificates[0].targets[1].chain_var",
        "must differ",
    ),
    # --- acme
    (
        "acme-directory-http",
        _set(("acme", "directory"), "http://acme.example/dir"),
        "acme.directory",
        "https://",
    ),
    (
        "acme-directory-file",
        _set(("acme", "directory"), "file:///etc/passwd"),
        "acme.directory",
        "https://",
    ),
    (
        "acme-staging-http",
        _set(("acme", "staging_directory"), "http://staging.example/dir"),
        "acme.staging_directory",
        "https://",
    ),
    ("acme-email", _set(("acme", "email"), "ops at example.com"), "acme.email", "email address"),
    ("acme-profile-shell", _set(("acme", "profile"), "tls;server"), "acme.profile", "profile name"),
    # --- dns
    (
        "dns-provider",
        _set(("dns", "provider"), "route53"),
        "dns.provider",
        "'cloudflare' or 'rfc2136'",
    ),
    (
        "dns-api-http-remote",
        _set(("dns", "api_base_url"), "http://api.cloudflare.com/v4"),
        "dns.api_base_url",
        "https://",
    ),
    (
        "dns-zone-ids-list",
        _set(("dns", "zone_ids"), ["abc"]),
        "dns.zone_ids",
        "zone name -> zone id",
    ),
    (
        "dns-zone-id-shell",
        _set(("dns", "zone_ids"), {"example.com": "abc;rm"}),
        "dns.zone_ids.example.com",
        "zone id",
    ),
    (
        "dns-zone-name-bad",
        _set(("dns", "zone_ids"), {"not a zone": "abc"}),
        "dns.zone_ids.not a zone",
        "not a valid domain name",
    ),
    (
        "dns-nameserver-port",
        _set(("dns", "nameservers"), ["127.0.0.1:53", "ns1:abc"]),
        "dns.nameservers[1]",
        "host:port",
    ),
    (
        "dns-nameservers-string",
        _set(("dns", "nameservers"), "127.0.0.1:53"),
        "dns.nameservers",
        "expected a JSON array",
    ),
    (
        "dns-propagation-zero",
        _set(("dns", "propagation_timeout"), 0),
        "dns.propagation_timeout",
        "from 1 to 3600",
    ),
    (
        "dns-propagation-string",
        _set(("dns", "propagation_timeout"), "180"),
        "dns.propagation_timeout",
        "number of seconds",
    ),
    (
        "rfc2136-server-missing",
        _set(("dns",), {"provider": "rfc2136"}),
        "dns.server",
        "is required",
    ),
    (
        "rfc2136-server-space",
        _set(("dns",), {**RFC2136, "server": "ns 1:53"}),
        "dns.server",
        "host:port",
    ),
    (
        "rfc2136-server-port-zero",
        _set(("dns",), {**RFC2136, "server": "127.0.0.1:0"}),
        "dns.server",
        "host:port",
    ),
    (
        "rfc2136-algorithm",
        _set(("dns",), {**RFC2136, "tsig_algorithm": "hmac-md5"}),
        "dns.tsig_algorithm",
        "expected one of hmac-sha256",
    ),
    (
        "rfc2136-tsig-name-space",
        _set(("dns",), {**RFC2136, "tsig_name": "my key"}),
        "dns.tsig_name",
        "not a valid domain name",
    ),
    (
        "cloudflare-with-server",
        _set(("dns", "server"), "127.0.0.1:53"),
        "dns.server",
        "only used when provider is 'rfc2136'",
    ),
    # --- renewal
    (
        "before-days-zero",
        _set(("renewal", "before_days"), 0),
        "renewal.before_days",
        "from 1 to 365",
    ),
    (
        "before-days-huge",
        _set(("renewal", "before_days"), 10**18),
        "renewal.before_days",
        "from 1 to 365",
    ),
    (
        "before-days-float",
        _set(("renewal", "before_days"), 7.5),
        "renewal.before_days",
        "whole number",
    ),
    (
        "before-days-bool",
        _set(("renewal", "before_days"), True),
        "renewal.before_days",
        "whole number",
    ),
    ("ari-string", _set(("renewal", "ari"), "yes"), "renewal.ari", "true or false"),
    (
        "concurrency-zero",
        _set(("renewal", "concurrency"), 0),
        "renewal.concurrency",
        "from 1 to 64",
    ),
    # --- notify
    (
        "notify-from-missing",
        _set(("notify",), {"to": "ops@example.com"}),
        "notify.from",
        "is required",
    ),
    (
        "notify-from-bad",
        _set(("notify",), {**NOTIFY, "from": "certs"}),
        "notify.from",
        "email address",
    ),
    (
        "notify-from-header-injection",
        _set(("notify",), {**NOTIFY, "from": "certs@example.com\r\nBcc: x@evil.example"}),
        "notify.from",
        "control characters",
    ),
    (
        "notify-to-missing",
        _set(("notify",), {"from": "certs@example.com"}),
        "notify.to",
        "email address",
    ),
    (
        "notify-to-bad",
        _set(("notify",), {**NOTIFY, "to": "ops@example.com, nobody"}),
        "notify.to",
        "email addresses",
    ),
    (
        "notify-to-too-many",
        _set(("notify",), {**NOTIFY, "to": [f"u{i}@example.com" for i in range(51)]}),
        "notify.to",
        "at most 50",
    ),
    ("notify-type", _set(("notify",), {**NOTIFY, "type": "sendgrid"}), "notify.type", "'mailpace'"),
    (
        "notify-url-http",
        _set(("notify",), {**NOTIFY, "api_base_url": "http://mail.example"}),
        "notify.api_base_url",
        "https://",
    ),
    ("heartbeat-url", _set(("heartbeat_url",), "ftp://hb.example"), "heartbeat_url", "https://"),
]


@pytest.mark.parametrize(
    ("patch", "field", "fragment"),
    [pytest.param(p, f, m, id=i) for i, p, f, m in BAD_CONFIGS],
)
def test_bad_config_names_the_field(patch: Patch, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(patch))
    assert caught.value.field == field
    assert fragment in caught.value.expected
    assert str(caught.value).startswith(f"{field}: ")


def test_there_are_at_least_40_bad_configs() -> None:
    assert len(BAD_CONFIGS) >= 40
    assert len({case[0] for case in BAD_CONFIGS}) == len(BAD_CONFIGS)


def test_base_of_the_bad_cases_is_valid() -> None:
    """Negative control: every bad case differs from a config that parses."""
    config = parse_config(copy.deepcopy(BASE))
    assert config.certificates[0].domains == ("smtp.example.com", "mx.example.com")
    # The variations the bad cases are built from are themselves fine here.
    parse_config(_patched(_set(("dns",), RFC2136)))
    parse_config(_patched(_set(("notify",), NOTIFY)))
    parse_config(_patched(_append(("certificates",), SECOND_CERT)))
    parse_config(_patched(_set((*T1, "reload_command"), ["systemctl", "reload", "smtp"])))


# --------------------------------------------------------------------- bugs found


@pytest.mark.parametrize("section", ["acme", "dns", "renewal"])
@pytest.mark.parametrize("value", [[], "", 0, False])
def test_falsy_section_that_is_not_an_object_is_rejected(section: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(_set((section,), value)))
    assert caught.value.field == section


def test_api_url_with_broken_ipv6_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(_set(("dns", "api_base_url"), "https://[::1")))
    assert caught.value.field == "dns.api_base_url"


def test_api_url_with_port_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(_set(("dns", "api_base_url"), "http://127.0.0.1:99999/v4")))
    assert caught.value.field == "dns.api_base_url"


def test_nameserver_host_with_shell_metacharacters_is_rejected() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(_set(("dns", "nameservers"), ["$(reboot):53"])))
    assert caught.value.field == "dns.nameservers[0]"


def test_tsig_name_with_cloudflare_names_tsig_name() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(_set(("dns", "tsig_name"), "renewer-key")))
    assert caught.value.field == "dns.tsig_name"


def test_bad_recipient_in_a_list_names_its_index() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_patched(_set(("notify",), {**NOTIFY, "to": ["ops@example.com", "x"]})))
    assert caught.value.field == "notify.to[1]"


# --------------------------------------------------------------------- valid configs


def test_design_example_parses_to_the_expected_objects() -> None:
    config = parse_config(copy.deepcopy(DESIGN_EXAMPLE))
    assert config == RenewerConfig(
        certificates=(
            CertificateConfig(
                name="smtp",
                domains=("smtp.example.com", "smtp.example.net"),
                key_type="ecdsa-p256",
                endpoints=(
                    Endpoint("smtp.example.com", 587, "starttls"),
                    Endpoint("smtp.example.com", 465, "tls"),
                ),
                targets=(
                    FlyTargetConfig(app="example-smtp"),
                    DotenvTargetConfig(path=Path("smtp.env")),
                ),
            ),
        ),
        acme=AcmeSettings(),
        dns=DnsSettings(),
        renewal=RenewalPolicy(),
        notify=NotifyConfig(sender="certs@example.com", to=("ops@example.com",)),
    )
    assert config.fly_apps == ("example-smtp",)


def test_minimal_config_gets_the_design_defaults() -> None:
    config = parse_config(copy.deepcopy(MINIMAL))
    assert config.acme.directory == LETS_ENCRYPT
    assert (config.acme.email, config.acme.ca_bundle, config.acme.profile) == (None, None, None)
    assert config.dns.provider == "cloudflare"
    assert config.dns.api_base_url == CLOUDFLARE_API
    assert dict(config.dns.zone_ids) == {}
    assert config.dns.nameservers == ()
    assert config.dns.propagation_timeout == 180
    assert config.dns.rfc2136 is None
    assert (config.renewal.before_days, config.renewal.ari, config.renewal.concurrency) == (
        30,
        True,
        4,
    )
    cert = config.certificates[0]
    assert cert.key_type == "ecdsa-p256"
    assert cert.endpoints == ()
    assert cert.targets == ()
    assert config.notify is None
    assert config.fly_apps == ()


def test_target_defaults() -> None:
    config = parse_config(copy.deepcopy(BASE))
    fly, dotenv = config.certificates[0].targets
    assert isinstance(fly, FlyTargetConfig)
    assert (fly.key_secret, fly.chain_secret) == ("PRIVATEKEY", "FULLCHAIN")
    assert fly.api_base_url == FLY_API
    assert fly.wait_timeout == 300
    assert isinstance(dotenv, DotenvTargetConfig)
    assert dotenv.path == Path("smtp.env")
    assert (dotenv.key_var, dotenv.chain_var, dotenv.reload_command) == (
        "PRIVATEKEY",
        "FULLCHAIN",
        None,
    )
    assert parse_config(_patched(_set(("notify",), NOTIFY))).notify == NotifyConfig(
        sender="certs@example.com", to=("ops@example.com",), api_base_url=MAILPACE_API
    )


def test_config_objects_are_frozen() -> None:
    config = parse_config(copy.deepcopy(BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.certificates[0].name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.renewal.before_days = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.certificates[0].targets[0].app = "x"  # type: ignore[union-attr,misc]
    assert isinstance(config.certificates, tuple)
    assert isinstance(config.certificates[0].domains, tuple)


def test_values_are_normalised() -> None:
    config = parse_config(
        _patched(
            _both(
                _set((*C0, "domains"), ["SMTP.Example.COM.", "bücher.example.com"]),
                _set((*T1, "reload_command"), ["kill", "-HUP", "1"]),
                _set(("dns", "api_base_url"), "http://127.0.0.1:8080/client/v4/"),
                _set(("dns", "nameservers"), ["127.0.0.1:5353", "[::1]:53", "ns1.example.com"]),
                _set(("notify",), {**NOTIFY, "to": "a@example.com, b@example.com"}),
            )
        )
    )
    cert = config.certificates[0]
    # IDNs become punycode (the form CAs and DNS use); names are lowercased, no root dot.
    assert cert.domains == ("smtp.example.com", "xn--bcher-kva.example.com")
    assert cert.targets[1] == DotenvTargetConfig(
        path=Path("smtp.env"), reload_command=("kill", "-HUP", "1")
    )
    # Loopback http is allowed (tests); the trailing slash is dropped.
    assert config.dns.api_base_url == "http://127.0.0.1:8080/client/v4"
    assert config.dns.nameservers == (("127.0.0.1", 5353), ("::1", 53), ("ns1.example.com", 53))
    assert config.notify is not None
    assert config.notify.to == ("a@example.com", "b@example.com")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("bücher.example.com", "xn--bcher-kva.example.com"),
        ("BÜCHER.example.com", "xn--bcher-kva.example.com"),
        ("mail.例え.jp", "mail.xn--r8jz45g.jp"),
        ("*.bücher.example.com", "*.xn--bcher-kva.example.com"),
    ],
)
def test_idn_domains_become_punycode(raw: str, expected: str) -> None:
    config = parse_config(_patched(_set((*C0, "domains"), [raw])))
    assert config.certificates[0].domains == (expected,)


def test_wildcard_is_allowed_as_a_name() -> None:
    config = parse_config(_patched(_set((*C0, "domains"), ["*.example.com", "example.com"])))
    assert config.certificates[0].domains == ("*.example.com", "example.com")
    # Negative control: a wildcard anywhere else is not a name.
    with pytest.raises(ConfigError):
        parse_config(_patched(_set((*C0, "domains"), ["smtp.*.com"])))


def test_rfc2136_settings() -> None:
    config = parse_config(
        _patched(
            _set(("dns",), {**RFC2136, "tsig_name": "renewer", "tsig_algorithm": "HMAC-SHA512"})
        )
    )
    assert config.dns.rfc2136 is not None
    assert config.dns.rfc2136.server == ("127.0.0.1", 5353)
    assert config.dns.rfc2136.tsig_name == "renewer"
    assert config.dns.rfc2136.tsig_algorithm == "hmac-sha512"
    default_port = parse_config(_patched(_set(("dns",), {**RFC2136, "server": "ns1.example"})))
    assert default_port.dns.rfc2136 is not None
    assert default_port.dns.rfc2136.server == ("ns1.example", 53)


# --------------------------------------------------------------------- secrets


def _config(patch: Patch | None = None) -> RenewerConfig:
    return parse_config(_patched(patch) if patch else copy.deepcopy(BASE))


def _without(*names: str) -> dict[str, str]:
    return {k: v for k, v in ENV_ALL.items() if k not in names}


# (id, config patch, environment, the variable named)
BAD_ENVIRONMENTS: list[tuple[str, Patch | None, dict[str, str], str]] = [
    ("cloudflare-token-missing", None, _without("CLOUDFLARE_API_TOKEN"), "CLOUDFLARE_API_TOKEN"),
    (
        "cloudflare-token-blank",
        None,
        {**ENV_ALL, "CLOUDFLARE_API_TOKEN": "  \t"},
        "CLOUDFLARE_API_TOKEN",
    ),
    ("fly-token-missing", None, _without("FLY_API_TOKEN"), "FLY_API_TOKEN"),
    ("fly-token-empty", None, {**ENV_ALL, "FLY_API_TOKEN": ""}, "FLY_API_TOKEN"),
    (
        "mailpace-token-missing",
        _set(("notify",), NOTIFY),
        _without("MAILPACE_TOKEN"),
        "MAILPACE_TOKEN",
    ),
    (
        "tsig-secret-missing",
        _set(("dns",), {**RFC2136, "tsig_name": "renewer"}),
        _without("RFC2136_TSIG_SECRET"),
        "RFC2136_TSIG_SECRET",
    ),
    ("everything-missing", None, {}, "CLOUDFLARE_API_TOKEN"),
]


@pytest.mark.parametrize(
    ("patch", "env", "variable"),
    [pytest.param(p, e, v, id=i) for i, p, e, v in BAD_ENVIRONMENTS],
)
def test_missing_secret_names_the_variable(
    patch: Patch | None, env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_secrets(_config(patch), env)
    assert caught.value.field == variable
    assert "required" in caught.value.expected


def test_secrets_are_required_only_when_the_config_needs_them() -> None:
    # Negative controls for the table above.
    no_fly = _set((*C0, "targets"), [{"type": "dotenv", "path": "smtp.env"}])
    secrets = load_secrets(_config(no_fly), {"CLOUDFLARE_API_TOKEN": "cf"})
    assert secrets.fly_api_token is None
    assert secrets.mailpace_token is None
    rfc_no_tsig = _both(no_fly, _set(("dns",), RFC2136))
    assert load_secrets(_config(rfc_no_tsig), {}).cloudflare_api_token is None
    with_all = load_secrets(_config(_set(("notify",), NOTIFY)), ENV_ALL)
    assert with_all.cloudflare_api_token == Secret("cf-token-value-1234")
    assert with_all.fly_api_token == Secret("FlyV1 fm2_abcdef")
    assert with_all.mailpace_token == Secret("mailpace-token-5678")
    tsig = _set(("dns",), {**RFC2136, "tsig_name": "renewer"})
    assert load_secrets(_config(tsig), ENV_ALL).rfc2136_tsig_secret == Secret(
        ENV_ALL["RFC2136_TSIG_SECRET"]
    )


def test_secret_values_never_show() -> None:
    value = "tok-9f8e7d6c5b4a"
    secret = Secret(value)
    assert value not in repr(secret)
    assert value not in str(secret)
    assert value not in f"{secret}"
    assert value not in f"{secret!r}"
    assert value not in f"{secret:>40}"
    assert value not in "%s %r" % (secret, secret)  # noqa: UP031 - the old style too
    assert value not in str(ValueError(secret))
    assert value not in repr([secret, {"k": secret}])
    secrets = load_secrets(_config(), {**ENV_ALL, "CLOUDFLARE_API_TOKEN": value})
    assert value not in repr(secrets)
    assert value not in str(secrets)
    assert secrets.cloudflare_api_token is not None
    # Negative control: the value is there, only hidden.
    assert secrets.cloudflare_api_token.reveal() == value
    assert value in secrets.all_values()


def test_secret_does_not_leak_into_logs_or_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    value = "tok-1a2b3c4d5e6f"
    secret = Secret(value)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("renewer.test").info("token is %s (%r)", secret, secret)
    assert "<redacted>" in caplog.text
    assert value not in caplog.text
    try:
        raise ConfigError("CLOUDFLARE_API_TOKEN", f"rejected {secret}")
    except ConfigError as exc:
        assert value not in str(exc)
        assert value not in repr(exc)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_missing_secret_error_does_not_echo_other_secrets() -> None:
    with pytest.raises(ConfigError) as caught:
        load_secrets(_config(_set(("notify",), NOTIFY)), _without("MAILPACE_TOKEN"))
    for value in ENV_ALL.values():
        assert value not in str(caught.value)


# --------------------------------------------------------------------- sources


def test_read_config_source_prefers_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MINIMAL), encoding="utf-8")
    env = {"RENEWER_CONFIG": json.dumps(BASE)}
    assert read_config_source(str(path), env) == MINIMAL
    assert read_config_source(None, env) == BASE


# (id, file content or None for "no file", environment, field, fragment)
BAD_SOURCES: list[tuple[str, bytes | None, dict[str, str], str, str]] = [
    ("nothing-given", None, {}, "--config", "RENEWER_CONFIG"),
    ("env-blank", None, {"RENEWER_CONFIG": "   "}, "--config", "RENEWER_CONFIG"),
    (
        "env-invalid-json",
        None,
        {"RENEWER_CONFIG": "{certificates: []}"},
        "RENEWER_CONFIG",
        "not valid JSON (line 1, column 2",
    ),
    (
        "env-truncated",
        None,
        {"RENEWER_CONFIG": '{"certificates": ['},
        "RENEWER_CONFIG",
        "not valid JSON",
    ),
    ("file-invalid-json", b'{"a": 1,}', {}, "--config", "not valid JSON"),
    ("file-empty", b"", {}, "--config", "not valid JSON"),
    ("file-huge", b" " * 1_000_001 + b"{}", {}, "--config", "larger than 1 MB"),
]


@pytest.mark.parametrize(
    ("content", "env", "field", "fragment"),
    [pytest.param(c, e, f, m, id=i) for i, c, e, f, m in BAD_SOURCES],
)
def test_bad_config_source(
    tmp_path: Path, content: bytes | None, env: dict[str, str], field: str, fragment: str
) -> None:
    path = None
    if content is not None:
        path = tmp_path / "config.json"
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        read_config_source(str(path) if path else None, env)
    assert caught.value.field == field
    assert fragment in caught.value.expected


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        read_config_source(str(tmp_path / "missing.json"), {})
    assert (caught.value.field, "No such file") == ("--config", "No such file")
    assert "No such file" in caught.value.expected
    with pytest.raises(ConfigError) as caught:
        read_config_source(str(tmp_path), {})
    assert caught.value.field == "--config"
    assert "directory" in caught.value.expected.lower()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("[" * 200_000 + "]" * 200_000, id="deeply-nested"),
        pytest.param('{"renewal": {"before_days": ' + "9" * 5000 + "}}", id="huge-integer"),
    ],
)
def test_pathological_json_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_config_source(None, {"RENEWER_CONFIG": text})
    assert caught.value.field == "RENEWER_CONFIG"


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'\xff\xfe{"certificates": []}')
    with pytest.raises(ConfigError) as caught:
        read_config_source(str(path), {})
    assert caught.value.field == "--config"


def test_duplicate_json_keys_are_rejected() -> None:
    text = '{"certificates": [], "certificates": [{"name": "a", "domains": ["a.example.com"]}]}'
    with pytest.raises(ConfigError) as caught:
        parse_config(read_config_source(None, {"RENEWER_CONFIG": text}))
    assert "certificates" in caught.value.field


# --------------------------------------------------------------------- local paths


def test_check_local_paths_accepts_plain_paths(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "smtp.env").write_text("A=1\n")
    config = _config(_set((*T1, "path"), "conf/smtp.env"))
    check_local_paths(config, tmp_path)  # negative control: no error
    check_local_paths(_config(), tmp_path)  # a file that does not exist yet is fine


def test_symlinked_dotenv_file_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside.env"
    outside.write_text("")
    work = tmp_path / "work"
    work.mkdir()
    (work / "smtp.env").symlink_to(outside)
    with pytest.raises(ConfigError) as caught:
        check_local_paths(_config(), work)
    assert caught.value.field == "certificates[0].targets[1].path"
    assert "symlink" in caught.value.expected


def test_dotenv_path_through_a_symlinked_folder_is_rejected(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "conf").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ConfigError) as caught:
        check_local_paths(_config(_set((*T1, "path"), "conf/smtp.env")), work)
    assert caught.value.field == "certificates[0].targets[1].path"
    assert "symlink" in caught.value.expected


def test_dangling_symlink_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "smtp.env").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as caught:
        check_local_paths(_config(), tmp_path)
    assert caught.value.field == "certificates[0].targets[1].path"


def test_dotenv_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        check_local_paths(_config(_set((*T1, "path"), "missing/smtp.env")), tmp_path)
    assert caught.value.field == "certificates[0].targets[1].path"
    assert "does not exist" in caught.value.expected


def test_ca_bundle_must_exist(tmp_path: Path) -> None:
    config = _config(_set(("acme", "ca_bundle"), "ca.pem"))
    with pytest.raises(ConfigError) as caught:
        check_local_paths(config, tmp_path)
    assert caught.value.field == "acme.ca_bundle"
    (tmp_path / "ca.pem").write_text("x")
    check_local_paths(config, tmp_path)  # negative control


def test_load_settings_checks_everything(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(BASE), encoding="utf-8")
    settings = load_settings(str(path), ENV_ALL, tmp_path)
    assert settings.config == _config()
    assert isinstance(settings.secrets, Secrets)
    (tmp_path / "smtp.env").symlink_to(tmp_path / "config.json")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), ENV_ALL, tmp_path)
    assert caught.value.field == "certificates[0].targets[1].path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "smtp.env"]


@pytest.mark.parametrize(
    ("patch", "variable", "value"),
    [
        pytest.param(None, "CLOUDFLARE_API_TOKEN", "abc\ndef", id="token-newline"),
        pytest.param(None, "FLY_API_TOKEN", "FlyV1 fm2_a\r\nX-Evil: 1", id="fly-token-crlf"),
        pytest.param(
            _set(("dns",), {**RFC2136, "tsig_name": "renewer"}),
            "RFC2136_TSIG_SECRET",
            "not base64!",
            id="tsig-not-base64",
        ),
    ],
)
def test_malformed_secret_is_a_config_error(patch: Patch | None, variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_secrets(_config(patch), {**ENV_ALL, variable: value})
    assert caught.value.field == variable
    assert value not in str(caught.value)
