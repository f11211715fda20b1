"""A Cloudflare API v4 look-alike for DNS-01: zones, TXT records, token checks, faults.

Shapes follow cloudflare-mailpace-acme.md section A: ``Authorization: Bearer <token>``,
the envelope ``{success, errors, messages, result, result_info?}`` with ``{code, message}``
entries, ``GET /zones?name=``, ``GET|POST /zones/{id}/dns_records``, ``DELETE
/zones/{id}/dns_records/{rid}`` -> ``{"id": ...}``, ``GET /user/tokens/verify``. TXT
records written here go into a ``RecordStore``, unquoted, so the loopback DNS server
serves them to Pebble; the API keeps ``content`` exactly as it was posted (A.4).

Error codes: 6003 (+ error_chain 6111) malformed/missing Authorization (A.2), 9109
unknown token (A.4), 10000 "Authentication error" HTTP 403 for a token without the
permission or zone (A.4/A.6), 81058 identical duplicate (A.4), 81044 "Record does not
exist." (what Cloudflare answers for an unknown record id), 7003 "Could not route to
..., perhaps your object identifier is invalid?" for an unknown zone id, 7000/7001 for
unknown routes/methods, 1004 "DNS Validation Error" and 9021 invalid TTL for bad records.
The last four are Cloudflare's codes as seen in client issues, not in section A: plausible.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from emulators.dns_server import RecordStore
from emulators.http_server import BackgroundHttpServer

API_PREFIX = "/client/v4"
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{40}$")  # Cloudflare API tokens are 40 characters
_QUOTED_RE = re.compile(r'^\s*(?:"(?:[^"\\]|\\.)*"\s*)+$')
_STRING_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
_SUPPORTED_TYPES = frozenset({"TXT"})
_ZONES_MAX_PER_PAGE = 50
_RECORDS_MAX_PER_PAGE = 5000

Reply = tuple[int, dict[str, Any] | None, dict[str, str]]  # status, JSON body, headers


def new_token() -> str:
    """A token in Cloudflare's format (40 URL-safe characters), for tests and the demo."""
    return secrets.token_urlsafe(30)


@dataclass(frozen=True)
class TokenScope:
    """What a token may do: ``zone_ids`` None means every zone of the account."""

    zone_ids: frozenset[str] | None = None
    can_list_zones: bool = True  # "Zone Read"
    can_edit_dns: bool = True  # "DNS Write"

    def covers(self, zone_id: str) -> bool:
        return self.zone_ids is None or zone_id in self.zone_ids


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the emulator saw it; the Authorization header is never kept."""

    method: str
    path: str  # without the query, e.g. /client/v4/zones
    query: dict[str, list[str]]
    status: int


@dataclass
class _Fault:
    method: str
    pattern: str
    status: int
    times: int
    retry_after: int | None
    delay: float

    def matches(self, method: str, path: str) -> bool:
        relative = path.removeprefix(API_PREFIX) or "/"
        return (self.method in ("*", method)) and (
            fnmatch.fnmatchcase(relative, self.pattern) or fnmatch.fnmatchcase(path, self.pattern)
        )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _envelope(result: Any, *, result_info: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if result_info is not None:
        body["result_info"] = result_info
    return body


def _failure(
    status: int, code: int, message: str, chain: list[dict[str, Any]] | None = None
) -> Reply:
    error: dict[str, Any] = {"code": code, "message": message}
    if chain:
        error["error_chain"] = chain
    return status, {"success": False, "errors": [error], "messages": [], "result": None}, {}


def _auth_error() -> Reply:
    # A.6: a token that lacks the permission on the resource gets HTTP 403, code 10000.
    return _failure(403, 10000, "Authentication error")


def dns_value(content: str) -> str:
    """What DNS serves for a TXT ``content``: quoted strings are joined unquoted (A.4),
    unquoted content is served as it is."""
    if _QUOTED_RE.match(content):
        parts = _STRING_RE.findall(content)
        return "".join(re.sub(r"\\(.)", r"\1", part) for part in parts)
    return content


def _text_match(query: Mapping[str, str], field: str, actual: str | None, *, fold: bool) -> bool:
    """The list filters of A.4: ``field`` / ``field.exact`` (exact), ``.contains``,
    ``.startswith``, ``.endswith``; names compare case-insensitively."""

    def norm(text: str) -> str:
        return text.rstrip(".").lower() if fold else text

    value = norm(actual or "")
    exact = query.get(f"{field}.exact", query.get(field))
    if exact is not None and value != norm(exact):
        return False
    contains = query.get(f"{field}.contains")
    if contains is not None and norm(contains) not in value:
        return False
    starts = query.get(f"{field}.startswith")
    if starts is not None and not value.startswith(norm(starts)):
        return False
    ends = query.get(f"{field}.endswith")
    return ends is None or value.endswith(norm(ends))


def _page(items: list[Any], query: Mapping[str, str], default: int, maximum: int) -> Reply:
    try:
        page = max(1, int(query.get("page", "1")))
        per_page = min(max(1, int(query.get("per_page", str(default)))), maximum)
    except ValueError:
        return _failure(400, 1001, "Invalid pagination parameters")  # plausible
    start = (page - 1) * per_page
    chunk = items[start : start + per_page]
    total_pages = max(1, -(-len(items) // per_page))
    info = {
        "page": page,
        "per_page": per_page,
        "count": len(chunk),
        "total_count": len(items),
        "total_pages": total_pages,
    }
    return 200, _envelope(chunk, result_info=info), {}


class CloudflareApi:
    """Serves ``zones`` (name -> id) to ``tokens`` (value -> scope) on 127.0.0.1.

    Use as a context manager; ``base_url`` is ``http://127.0.0.1:PORT/client/v4``.
    """

    def __init__(
        self,
        store: RecordStore,
        zones: Mapping[str, str],
        tokens: Mapping[str, TokenScope],
    ) -> None:
        for token in tokens:
            if not TOKEN_RE.match(token):
                raise ValueError("emulator tokens must be 40 URL-safe characters (new_token())")
        self.store = store
        self._zones = {name.rstrip(".").lower(): zone_id for name, zone_id in zones.items()}
        self._zone_names = {zone_id: name for name, zone_id in self._zones.items()}
        self._tokens = dict(tokens)
        self._lock = threading.Lock()
        self._records: dict[str, dict[str, Any]] = {}  # record id -> API record
        self._faults: list[_Fault] = []
        self._log: list[LoggedRequest] = []
        self._server: BackgroundHttpServer | None = None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> CloudflareApi:
        api = self

        class Handler(_Handler):
            owner = api

        self._server = BackgroundHttpServer(Handler)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("CloudflareApi is not running")
        return f"http://127.0.0.1:{self._server.port}{API_PREFIX}"

    # -- test helpers ------------------------------------------------------------------

    def inject_fault(
        self,
        method: str,
        path_pattern: str,
        *,
        status: int,
        times: int = 1,
        retry_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next ``times`` requests matching ``method`` ("*" for any) and the glob
        ``path_pattern`` (relative to /client/v4, e.g. ``/zones/*/dns_records``) wait
        ``delay`` seconds, then answer ``status``: 429 with ``retry-after`` and
        ``Ratelimit`` headers (A.5), 502/504 with an empty body, other errors with an
        envelope. A status below 400 means "only slow": the request is then served
        normally after the delay (a client that timed out has had its change applied)."""
        with self._lock:
            self._faults.append(
                _Fault(method.upper(), path_pattern, status, times, retry_after, delay)
            )

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def records(self, zone_id: str | None = None) -> list[dict[str, Any]]:
        """The API's view of the records (copies), optionally of one zone."""
        with self._lock:
            return [dict(r) for r in self._records.values() if zone_id in (None, r["zone_id"])]

    def add_record(self, zone_id: str, name: str, content: str, comment: str | None = None) -> str:
        """Seed a TXT record as if made earlier (e.g. left over by a crashed run)."""
        status, body, _ = self._create(
            zone_id,
            {"type": "TXT", "name": name, "content": content, "ttl": 60, "comment": comment},
        )
        if status != 200 or body is None:
            raise ValueError(f"cannot seed record: {body}")
        return str(body["result"]["id"])

    # -- dispatch ----------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[Reply, float]:
        """One request -> (reply, delay before answering)."""
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        multi = parse_qs(split.query, keep_blank_values=True)
        query = {key: values[-1] for key, values in multi.items()}
        delay = 0.0
        fault = self._take_fault(method, path)
        if fault is not None:
            delay = fault.delay
            reply = self._fault_reply(fault) if fault.status >= 400 else None
        else:
            reply = None
        if reply is None:
            reply = self._route(method, path, query, headers, raw)
        with self._lock:
            self._log.append(LoggedRequest(method, path, multi, reply[0]))
        return reply, delay

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    @staticmethod
    def _fault_reply(fault: _Fault) -> Reply:
        if fault.status == 429:
            wait = fault.retry_after if fault.retry_after is not None else 1
            status, body, _ = _failure(
                429, 971, "Please wait and consider throttling your request speed"
            )
            headers = {
                "retry-after": str(wait),
                "Ratelimit": f'"default";r=0;t={wait}',
                "Ratelimit-Policy": '"default";q=1200;w=300',
            }
            return status, body, headers
        extra = {} if fault.retry_after is None else {"retry-after": str(fault.retry_after)}
        if fault.status in (502, 504):
            return fault.status, None, extra  # the edge answers without an API envelope
        status, body, _ = _failure(
            fault.status, 10001 if fault.status >= 500 else 10000, "injected fault"
        )
        return status, body, extra

    def _route(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        raw: bytes,
    ) -> Reply:
        if not path.startswith(API_PREFIX + "/"):
            return _failure(404, 7000, "No route for that URI")
        parts = path[len(API_PREFIX) + 1 :].split("/")
        scope_or_error = self._authenticate(headers)
        if not isinstance(scope_or_error, TokenScope):
            return scope_or_error
        scope = scope_or_error
        if parts == ["user", "tokens", "verify"]:
            if method != "GET":
                return _failure(405, 7001, "Method not allowed for this route")
            return self._verify(headers)
        if parts == ["zones"]:
            if method != "GET":
                return _failure(405, 7001, "Method not allowed for this route")
            return self._list_zones(scope, query)
        if len(parts) < 2 or parts[0] != "zones":
            return _failure(404, 7000, "No route for that URI")
        zone_id = parts[1]
        if zone_id not in self._zone_names:
            return _failure(
                404, 7003, f"Could not route to {path}, perhaps your object identifier is invalid?"
            )
        if not scope.covers(zone_id):
            return _auth_error()
        if len(parts) == 2:
            if method != "GET":
                return _failure(405, 7001, "Method not allowed for this route")
            return 200, _envelope(self._zone(zone_id)), {}
        if parts[2] != "dns_records" or len(parts) > 4:
            return _failure(404, 7000, "No route for that URI")
        if not scope.can_edit_dns:
            return _auth_error()
        if len(parts) == 3:
            if method == "GET":
                return self._list_records(zone_id, query)
            if method == "POST":
                try:
                    body = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    return _failure(400, 9207, "Request body is invalid.")  # plausible
                if not isinstance(body, dict):
                    return _failure(400, 9207, "Request body is invalid.")
                return self._create(zone_id, body)
            return _failure(405, 7001, "Method not allowed for this route")
        record_id = parts[3]
        if method == "GET":
            with self._lock:
                record = self._records.get(record_id)
            if record is None or record["zone_id"] != zone_id:
                return _failure(404, 81044, "Record does not exist.")
            return 200, _envelope(dict(record)), {}
        if method == "DELETE":
            return self._delete(zone_id, record_id)
        return _failure(405, 7001, "Method not allowed for this route")

    def _authenticate(self, headers: Mapping[str, str]) -> TokenScope | Reply:
        value = headers.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not TOKEN_RE.match(token.strip()):
            # A.2: a missing, malformed or truncated token.
            return _failure(
                400,
                6003,
                "Invalid request headers",
                [{"code": 6111, "message": "Invalid format for Authorization header"}],
            )
        scope = self._tokens.get(token.strip())
        if scope is None:
            return _failure(403, 9109, "Invalid access token")
        return scope

    def _verify(self, headers: Mapping[str, str]) -> Reply:
        token = headers.get("authorization", "").partition(" ")[2].strip()
        token_id = hashlib.sha256(token.encode()).hexdigest()[:32]  # an id, not the token
        body = _envelope({"id": token_id, "status": "active"})
        body["messages"] = [
            {"code": 10000, "message": "This API Token is valid and active", "type": None}
        ]
        return 200, body, {}

    # -- zones -------------------------------------------------------------------------

    def _zone(self, zone_id: str) -> dict[str, Any]:
        name = self._zone_names[zone_id]
        return {
            "id": zone_id,
            "name": name,
            "status": "active",
            "paused": False,
            "type": "full",
            "development_mode": 0,
            "name_servers": [f"ns1.{name}"],
            "original_name_servers": None,
            "account": {"id": "0" * 32, "name": "emulated account"},
            "created_on": "2024-01-01T00:00:00.000000Z",
            "modified_on": "2024-01-01T00:00:00.000000Z",
            "activated_on": "2024-01-01T00:00:00.000000Z",
        }

    def _list_zones(self, scope: TokenScope, query: Mapping[str, str]) -> Reply:
        if not scope.can_list_zones:
            # Listing zones needs "Zone Read" (A.3); without it Cloudflare refuses with
            # 10000 even for a zone the token may edit (A.6, open question 3).
            return _auth_error()
        name = query.get("name", "").rstrip(".").lower()
        zones = [
            self._zone(zone_id)
            for zone_name, zone_id in sorted(self._zones.items())
            if scope.covers(zone_id) and (not name or zone_name == name)
        ]
        return _page(zones, query, 20, _ZONES_MAX_PER_PAGE)

    # -- records -----------------------------------------------------------------------

    def _list_records(self, zone_id: str, query: Mapping[str, str]) -> Reply:
        rtype = query.get("type")
        with self._lock:
            candidates = [dict(r) for r in self._records.values() if r["zone_id"] == zone_id]
        matched = [
            r
            for r in candidates
            if (rtype is None or r["type"] == rtype.upper())
            and _text_match(query, "name", r["name"], fold=True)
            and _text_match(query, "content", r["content"], fold=False)
            and _text_match(query, "comment", r["comment"], fold=False)
            and ("comment.present" not in query or r["comment"] is not None)
            and ("comment.absent" not in query or r["comment"] is None)
        ]
        matched.sort(key=lambda r: (r["created_on"], r["id"]))
        return _page(matched, query, 100, _RECORDS_MAX_PER_PAGE)

    def _create(self, zone_id: str, body: Mapping[str, Any]) -> Reply:
        zone = self._zone_names[zone_id]
        rtype, name, content = body.get("type"), body.get("name"), body.get("content")
        ttl, comment = body.get("ttl", 1), body.get("comment")
        if not isinstance(rtype, str) or rtype.upper() not in _SUPPORTED_TYPES:
            return _failure(
                400,
                1004,
                "DNS Validation Error",
                [{"code": 9000, "message": f"unsupported record type {rtype!r}"}],
            )
        if not isinstance(name, str) or not name.strip():
            return _failure(
                400, 1004, "DNS Validation Error", [{"code": 9005, "message": "name is required"}]
            )
        if not isinstance(content, str) or not content or len(content) > 4096:
            return _failure(
                400, 1004, "DNS Validation Error", [{"code": 9009, "message": "content is invalid"}]
            )
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, int)
            or not (ttl == 1 or 60 <= ttl <= 86400)
        ):
            return _failure(
                400, 9021, "Invalid TTL. Must be between 60 and 86400 seconds, or 1 for Automatic."
            )
        if comment is not None and (not isinstance(comment, str) or len(comment) > 100):
            return _failure(
                400, 1004, "DNS Validation Error", [{"code": 9101, "message": "comment is invalid"}]
            )
        if body.get("proxied"):
            return _failure(400, 9004, "This record type cannot be proxied.")
        fqdn = name.strip().rstrip(".").lower()
        if fqdn == "@":
            fqdn = zone
        elif fqdn != zone and not fqdn.endswith("." + zone):
            fqdn = f"{fqdn}.{zone}"  # a name outside the zone is taken as relative to it
        now = _now()
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "zone_id": zone_id,
            "zone_name": zone,
            "name": fqdn,
            "type": rtype.upper(),
            "content": content,
            "proxiable": False,
            "proxied": False,
            "ttl": ttl,
            "settings": {},
            "meta": {},
            "comment": comment,
            "tags": list(body.get("tags") or []),
            "created_on": now,
            "modified_on": now,
        }
        with self._lock:
            for other in self._records.values():
                if (other["zone_id"], other["type"], other["name"], other["content"]) == (
                    zone_id,
                    record["type"],
                    fqdn,
                    content,
                ):
                    return _failure(400, 81058, "An identical record already exists.")
            self._records[record["id"]] = record
            self.store.add(fqdn, "TXT", dns_value(content))
        return 200, _envelope(dict(record)), {}

    def _delete(self, zone_id: str, record_id: str) -> Reply:
        with self._lock:
            record = self._records.get(record_id)
            if record is None or record["zone_id"] != zone_id:
                return _failure(404, 81044, "Record does not exist.")
            del self._records[record_id]
            self.store.remove(record["name"], record["type"], dns_value(record["content"]))
        return 200, _envelope({"id": record_id}), {}


class _Handler(BaseHTTPRequestHandler):
    owner: CloudflareApi
    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections end on their own
    # Buffer the answer so headers and body leave in one segment: separate small writes
    # meet the client's delayed ACK and cost 40 ms per request on keep-alive connections.
    wbufsize = 64 * 1024

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read ``CloudflareApi.requests``."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        (status, body, extra), delay = self.owner.handle(self.command, self.path, headers, raw)
        if delay:
            time.sleep(delay)
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client gave up (timeout test)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()
