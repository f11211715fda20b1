"""cert-renewer's Pulumi program: stack config -> DnsToken + RenewerApp -> outputs.

Everything is checked before the first resource is declared: the stack keys by
``load_stack_config`` and the renewal JSON by the renewer's own parser, so a bad config
fails ``pulumi preview`` with a message that names the key. See docs/provisioning.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pulumi

from infra.commands import encode_pem
from infra.config import StackConfigError, load_stack_config
from infra.dns_token import DnsToken, DnsTokenArgs
from infra.flyctl import image_label
from infra.renewer_app import RenewerApp, RenewerAppArgs
from renewer.config import parse_config
from renewer.errors import ConfigError


def _renewer_config(raw: dict[str, object], zone_ids: dict[str, str]) -> str:
    """RENEWER_CONFIG: the stack's renewal JSON plus the zone ids Pulumi found, so the
    renewer never has to list zones (cloudflare-mailpace-acme.md A.6)."""
    data = json.loads(json.dumps(raw))
    dns = data.setdefault("dns", {})
    dns["zone_ids"] = {**zone_ids, **dns.get("zone_ids", {})}
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def main() -> None:
    cfg = load_stack_config(pulumi.Config())
    try:
        parse_config(cfg.renewer)
    except ConfigError as exc:
        raise StackConfigError("cert-renewer:renewer", str(exc)) from exc
    raw = dict(cfg.renewer)

    secrets: dict[str, pulumi.Input[str]] = {"FLY_API_TOKEN": cfg.secrets.fly_api_token}
    if cfg.secrets.mailpace_token is not None:
        secrets["MAILPACE_TOKEN"] = cfg.secrets.mailpace_token
    if cfg.secrets.acme_account_key is not None:
        secrets["ACME_ACCOUNT_KEY"] = cfg.secrets.acme_account_key.apply(encode_pem)
    if cfg.secrets.rfc2136_tsig_secret is not None:
        secrets["RFC2136_TSIG_SECRET"] = cfg.secrets.rfc2136_tsig_secret
    for name, key in cfg.secrets.certificate_keys.items():
        secrets[name] = key.apply(encode_pem)

    token_id: pulumi.Output[str] | None = None
    renewer_config: pulumi.Input[str] = _renewer_config(raw, {})
    if cfg.dns_provider == "cloudflare":
        dns = DnsToken(
            "dns",
            DnsTokenArgs(
                token_name=f"{cfg.app_name} DNS-01",
                zones=cfg.zones,
                caa_issuer=cfg.caa_issuer,
                domains=cfg.domains,
            ),
        )
        secrets["CLOUDFLARE_API_TOKEN"] = dns.value
        renewer_config = dns.zone_ids.apply(lambda ids: _renewer_config(raw, ids))
        token_id = dns.token_id

    app = RenewerApp(
        "renewer",
        RenewerAppArgs(
            app_name=cfg.app_name,
            fly_org=cfg.fly_org,
            region=cfg.region,
            schedule=cfg.schedule,
            memory_mb=cfg.memory_mb,
            fly_api_base_url=cfg.fly_api_base_url,
            provision_token=cfg.secrets.fly_provision_token,
            secrets=secrets,
            renewer_config=renewer_config,
            image=cfg.image,
            image_label=image_label(Path(__file__).resolve().parent),
        ),
    )

    pulumi.export("appName", app.app_name)
    pulumi.export("machineId", app.machine_id)
    pulumi.export("image", app.image)
    pulumi.export("schedule", app.schedule)
    pulumi.export("cloudflareTokenId", token_id)


main()
