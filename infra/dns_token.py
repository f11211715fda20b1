"""DnsToken: the least-privilege Cloudflare token the renewer uses for DNS-01.

cloudflare-mailpace-acme.md A.6: give the token Zone Read + DNS Write with its resources
limited to the zones in question (Zone Read covers the zone lookup some clients still
need); look the permission groups up by name rather than trusting ids copied from
examples (B.2). B.1: ``resources`` is a JSON-encoded string, ``permission_groups`` are
objects ``{"id": ...}``. B.1 also says mocks do not mark ``value`` secret, so we wrap it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_cloudflare as cloudflare

__all__ = ["PERMISSION_GROUPS", "ZONE_SCOPE", "DnsToken", "DnsTokenArgs"]

# The API's names for the dashboard's "Zone / Zone / Read" and "Zone / DNS / Edit" (A.6).
PERMISSION_GROUPS = ("Zone Read", "DNS Write")
ZONE_SCOPE = "com.cloudflare.api.account.zone"


@dataclass(frozen=True)
class DnsTokenArgs:
    token_name: str
    # Zone name -> zone id, or None to look the zone up by name.
    zones: Mapping[str, str | None]
    # With a CA domain (e.g. "letsencrypt.org"), CAA records on each name allow only it.
    caa_issuer: str | None = None
    domains: Sequence[str] = field(default_factory=tuple)


def _permission_ids(
    results: Sequence[object],
) -> list[cloudflare.ApiTokenPolicyPermissionGroupArgs]:
    by_name = {getattr(r, "name", None): getattr(r, "id", None) for r in results}
    missing = [name for name in PERMISSION_GROUPS if not by_name.get(name)]
    if missing:
        raise ValueError(f"Cloudflare permission groups not found by name: {', '.join(missing)}")
    return [
        cloudflare.ApiTokenPolicyPermissionGroupArgs(id=str(by_name[name]))
        for name in PERMISSION_GROUPS
    ]


def _zone_resources(zone_ids: Sequence[str]) -> str:
    return json.dumps({f"{ZONE_SCOPE}.{zone_id}": "*" for zone_id in sorted(zone_ids)})


def _zone_of(domain: str, zones: Sequence[str]) -> str:
    matches = [z for z in zones if domain == z or domain.endswith("." + z)]
    if not matches:
        raise ValueError(f"{domain}: no configured Cloudflare zone contains this name")
    return max(matches, key=len)


class DnsToken(pulumi.ComponentResource):
    """A Cloudflare API token limited to DNS edits on exactly the configured zones."""

    token_id: pulumi.Output[str]
    value: pulumi.Output[str]
    zone_ids: pulumi.Output[dict[str, str]]

    def __init__(
        self, name: str, args: DnsTokenArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("cert-renewer:cloudflare:DnsToken", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        invoke = pulumi.InvokeOptions(parent=self)
        if not args.zones:
            raise ValueError("DnsToken needs at least one zone")

        ids: dict[str, pulumi.Output[str]] = {}
        for zone, zone_id in sorted(args.zones.items()):
            if zone_id is not None:
                ids[zone] = pulumi.Output.from_input(zone_id)
            else:
                # B.4: `match` is required in the v6 filter.
                found = cloudflare.get_zone_output(
                    filter={"name": zone, "match": "all"}, opts=invoke
                )
                ids[zone] = found.id
        self.zone_ids = pulumi.Output.all(**ids).apply(lambda m: {k: str(v) for k, v in m.items()})

        groups = cloudflare.get_api_token_permission_groups_list_output(
            scope=ZONE_SCOPE, opts=invoke
        )
        token = cloudflare.ApiToken(
            f"{name}-token",
            name=args.token_name,
            policies=[
                cloudflare.ApiTokenPolicyArgs(
                    effect="allow",
                    permission_groups=groups.results.apply(_permission_ids),
                    resources=self.zone_ids.apply(lambda m: _zone_resources(list(m.values()))),
                )
            ],
            opts=child,
        )
        self.token_id = token.id
        self.value = pulumi.Output.secret(token.value)

        if args.caa_issuer is not None:
            zone_names = list(args.zones)
            for domain in args.domains:
                zone = _zone_of(domain, zone_names)
                # RFC 8659: an "issue" property names the only CA allowed to issue.
                cloudflare.DnsRecord(
                    f"{name}-caa-{domain}",
                    zone_id=ids[zone],
                    name=domain,
                    type="CAA",
                    ttl=1,
                    data=cloudflare.DnsRecordDataArgs(flags=0, tag="issue", value=args.caa_issuer),
                    comment="cert-renewer: only this CA may issue",
                    opts=child,
                )

        self.register_outputs(
            {"token_id": self.token_id, "value": self.value, "zone_ids": self.zone_ids}
        )
