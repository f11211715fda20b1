"""DNS-01 through the Cloudflare API v4 (cloudflare-mailpace-acme.md section A).

- Zone: a configured ``zone_ids`` entry (longest suffix wins) needs no lookup, so a token
  with DNS Write alone is enough (A.6). Otherwise candidate names are tried from the
  longest down with ``GET /zones?name=``; a 403/10000 on a wrong candidate means "not
  this zone", while 6003/9103/9109 (bad credentials) stop at once, as certbot does.
- Create: content quoted (A.4 TXT quoting), ttl 60, comment "cert-renewer"; the id from
  the answer is kept and the record deleted by id, as lego does. A duplicate (81057/81058,
  e.g. a retried POST that had gone through) counts as success; the id is then listed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import requests

from renewer.dns_provider import TxtRecord, candidate_zones, in_zone, normalize_name
from renewer.errors import ApiError, DnsChallengeError
from renewer.http import ApiSession
from renewer.sensitive import Secret

log = logging.getLogger(__name__)

SERVICE = "Cloudflare"
TTL = 60  # seconds; the lowest Cloudflare allows outside Enterprise (A.4)
COMMENT = "cert-renewer"  # marks our records so a later run can clean up leftovers
TOKENS_URL = "https://dash.cloudflare.com/profile/api-tokens"

# certbot's hints for credential errors (A.6): these stop the zone walk at once.
_CREDENTIAL_HINTS = {
    "6003": f"Did you copy your entire API token? See {TOKENS_URL} to manage your API tokens.",
    "9103": "Did you enter the correct email address and Global API key?",
    "9109": "Did you enter a valid Cloudflare API token?",
}
_DUPLICATE = frozenset({"81057", "81058"})
_NOT_FOUND = "81044"
_EDIT_HINT = "Does your API token have Zone:DNS:Edit on this zone?"


def parse_cloudflare_error(response: requests.Response) -> tuple[str, str | None]:
    """``(message, code)`` from the v4 envelope's first error and its ``error_chain``;
    raises ValueError for a body that is not an envelope (the session then falls back
    to a trimmed body)."""
    body = response.json()
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        raise ValueError("not a Cloudflare error envelope")
    first = errors[0]
    code = first.get("code")
    message = str(first.get("message") or "no message")
    chain = [
        str(link.get("message"))
        for link in first.get("error_chain") or []
        if isinstance(link, dict) and link.get("message")
    ]
    if chain:
        message = f"{message} ({'; '.join(chain)})"
    more = [str(e.get("message")) for e in errors[1:] if isinstance(e, dict)]
    if more:
        message = f"{message}; {'; '.join(more)}"
    return (f"{code}: {message}" if code is not None else message), (
        str(code) if code is not None else None
    )


def cloudflare_session(api_base_url: str, token: Secret, **kwargs: Any) -> ApiSession:
    """An ``ApiSession`` with the Bearer token and the envelope's error parser.
    ``kwargs`` go to ``ApiSession`` (timeout, max_attempts, sleep, ...)."""

    def auth() -> dict[str, str]:
        return {"Authorization": f"Bearer {token.reveal()}"}

    return ApiSession(SERVICE, api_base_url, auth, error_parser=parse_cloudflare_error, **kwargs)


class CloudflareDns:
    """``DnsProvider`` over Cloudflare API v4."""

    def __init__(
        self,
        api_base_url: str,
        token: Secret,
        zone_ids: Mapping[str, str],
        *,
        session: ApiSession | None = None,
    ) -> None:
        self._session = session or cloudflare_session(api_base_url, token)
        self._zone_ids = {normalize_name(name): zid for name, zid in zone_ids.items()}
        self._zones: dict[str, tuple[str, str]] = {}  # fqdn -> (zone, id), this instance only

    # -- DnsProvider -------------------------------------------------------------------

    def create_txt(self, fqdn: str, value: str) -> TxtRecord:
        fqdn = normalize_name(fqdn)
        zone, zone_id = self.find_zone(fqdn)
        body = {
            "type": "TXT",
            "name": fqdn,
            "content": _quote(value),
            "ttl": TTL,
            "comment": COMMENT,
        }
        try:
            response = self._session.request("POST", f"zones/{zone_id}/dns_records", json=body)
        except ApiError as exc:
            if exc.code in _DUPLICATE:
                # Already there: an earlier POST went through (A.4, certbot PR #10725).
                log.info("TXT record %s already exists in zone %s; reusing it", fqdn, zone)
                ids = self._find_ids(zone_id, fqdn, value)
                return TxtRecord(fqdn, value, zone, ids[0] if ids else None)
            raise self._error(f"create TXT {fqdn}", zone, exc, edit=True) from exc
        record_id = _result(response).get("id")
        if not isinstance(record_id, str):
            raise DnsChallengeError(f"Cloudflare created TXT {fqdn} in {zone} but sent no id")
        log.info("Created TXT record %s in Cloudflare zone %s", fqdn, zone)
        return TxtRecord(fqdn, value, zone, record_id)

    def delete_txt(self, record: TxtRecord) -> None:
        zone_id = self._zone_id_of(record)
        ids = [record.record_id] if record.record_id else []
        if not ids:
            ids = self._find_ids(zone_id, record.fqdn, record.value)[:1]
        for record_id in ids:
            try:
                self._session.request("DELETE", f"zones/{zone_id}/dns_records/{record_id}")
            except ApiError as exc:
                if exc.status == 404 or exc.code == _NOT_FOUND:
                    log.info("TXT record %s was already gone", record.fqdn)
                    continue  # idempotent
                raise self._error(f"delete TXT {record.fqdn}", record.zone, exc, edit=True) from exc
            log.info("Deleted TXT record %s from Cloudflare zone %s", record.fqdn, record.zone)

    def list_stale_txt(self, fqdn: str) -> list[TxtRecord]:
        fqdn = normalize_name(fqdn)
        zone, zone_id = self.find_zone(fqdn)
        params = {"type": "TXT", "name.exact": fqdn, "comment.exact": COMMENT}
        return [
            TxtRecord(fqdn, _unquote(str(r.get("content", ""))), zone, str(r["id"]))
            for r in self._list_records(zone_id, zone, params)
        ]

    # -- zone --------------------------------------------------------------------------

    def find_zone(self, fqdn: str) -> tuple[str, str]:
        """``(zone name, zone id)`` for ``fqdn``: configured first, else looked up."""
        fqdn = normalize_name(fqdn)
        configured = [z for z in self._zone_ids if in_zone(fqdn, z)]
        if configured:
            zone = max(configured, key=len)
            return zone, self._zone_ids[zone]
        if fqdn in self._zones:
            return self._zones[fqdn]
        refused: list[str] = []
        for candidate in candidate_zones(fqdn):
            try:
                response = self._session.request(
                    "GET", "zones", params={"name": candidate, "per_page": 50}
                )
            except ApiError as exc:
                hint = _CREDENTIAL_HINTS.get(exc.code or "")
                if hint:
                    raise DnsChallengeError(
                        f"Cloudflare rejected the API token while looking up the zone of "
                        f"{fqdn}: {exc.message}. {hint}"
                    ) from exc
                if exc.status == 403 or exc.code == "10000":
                    refused.append(candidate)  # a name the token may not see: not this zone
                    continue
                raise DnsChallengeError(
                    f"cannot look up the Cloudflare zone of {fqdn}: {exc}"
                ) from exc
            for entry in _result_list(response):
                if normalize_name(str(entry.get("name", ""))) == candidate and entry.get("id"):
                    found = (candidate, str(entry["id"]))
                    self._zones[fqdn] = found
                    log.info("Cloudflare zone of %s is %s (%s)", fqdn, candidate, found[1])
                    return found
        if refused:
            raise DnsChallengeError(
                f"cannot find the Cloudflare zone of {fqdn}: the API token may not list zones "
                f"(refused for {', '.join(refused)}). Give the token Zone:Zone:Read on the zone, "
                "or set dns.zone_ids to {zone name: zone id} so no lookup is needed."
            )
        raise DnsChallengeError(
            f"no Cloudflare zone visible to the API token contains {fqdn} "
            f"(tried {', '.join(candidate_zones(fqdn))})"
        )

    def _zone_id_of(self, record: TxtRecord) -> str:
        if record.zone in self._zone_ids:
            return self._zone_ids[record.zone]
        zone, zone_id = self.find_zone(record.fqdn)
        if zone != record.zone:
            raise DnsChallengeError(f"TXT {record.fqdn} is in zone {zone}, not {record.zone}")
        return zone_id

    # -- records -----------------------------------------------------------------------

    def _find_ids(self, zone_id: str, fqdn: str, value: str) -> list[str]:
        """Ids of TXT records at ``fqdn`` holding ``value``, quoted (as we create them) or
        unquoted (as older clients did; A.4)."""
        ids: list[str] = []
        zone = self._zone_name(zone_id, fqdn)
        for content in (_quote(value), value):
            params = {"type": "TXT", "name.exact": fqdn, "content.exact": content}
            ids += [str(r["id"]) for r in self._list_records(zone_id, zone, params)]
        return ids

    def _zone_name(self, zone_id: str, fqdn: str) -> str:
        for name, zid in self._zone_ids.items():
            if zid == zone_id:
                return name
        return self._zones.get(fqdn, (zone_id, zone_id))[0]

    def _list_records(
        self, zone_id: str, zone: str, params: Mapping[str, str]
    ) -> Iterator[dict[str, Any]]:
        page = 1
        while True:
            try:
                response = self._session.request(
                    "GET",
                    f"zones/{zone_id}/dns_records",
                    params={**params, "page": page, "per_page": 100},
                )
            except ApiError as exc:
                raise self._error("list TXT records", zone, exc, edit=True) from exc
            for record in _result_list(response):
                if record.get("id"):
                    yield record
            info = response.json().get("result_info") or {}
            if page >= int(info.get("total_pages") or 1):
                return
            page += 1

    @staticmethod
    def _error(what: str, zone: str, exc: ApiError, *, edit: bool) -> DnsChallengeError:
        hint = _CREDENTIAL_HINTS.get(exc.code or "")
        if hint is None and edit and (exc.status == 403 or exc.code in ("1009", "10000")):
            hint = _EDIT_HINT  # certbot's hint for 1009 (A.4)
        suffix = f" {hint}" if hint else ""
        return DnsChallengeError(f"Cloudflare: cannot {what} in zone {zone}: {exc}.{suffix}")


def _quote(value: str) -> str:
    # One RFC 1035 character-string; ACME values are base64url, so nothing to escape.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(content: str) -> str:
    if len(content) >= 2 and content[0] == content[-1] == '"':
        return content[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return content


def _result(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise DnsChallengeError("Cloudflare answered with a body that is not JSON") from exc
    result = body.get("result") if isinstance(body, dict) else None
    if not isinstance(result, dict):
        raise DnsChallengeError("Cloudflare answered without a result object")
    return result


def _result_list(response: requests.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except ValueError as exc:
        raise DnsChallengeError("Cloudflare answered with a body that is not JSON") from exc
    result = body.get("result") if isinstance(body, dict) else None
    if not isinstance(result, list):
        raise DnsChallengeError("Cloudflare answered without a result list")
    return [item for item in result if isinstance(item, dict)]
