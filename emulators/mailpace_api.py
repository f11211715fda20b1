"""A MailPace-compatible sink: ``POST /api/v1/send`` validated as the real API does.

Shapes follow cloudflare-mailpace-acme.md section C: headers ``Accept`` and
``Content-Type: application/json`` (406 otherwise), ``MailPace-Server-Token`` (401 when
missing, 400 when unknown), ``from`` whose domain must be the token's (403), ``to`` with
1..50 addresses, ``textbody`` or ``htmlbody``, ``tags`` a string or a list of strings,
``Idempotency-Key`` (<= 255 characters, replays return the first stored answer and send
nothing). Success is 200 ``{"id": <int>, "status": "pending"}``; errors are
``{"error": "..."}`` or ``{"errors": {"field": ["..."]}}``; 500 has an empty body.

Nothing is delivered: accepted messages are appended to ``.messages`` (and printed when
``print_messages=True``, for the demo).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any

from emulators.http_server import BackgroundHttpServer

_MAX_RECIPIENTS = 50
_MAX_IDEMPOTENCY_KEY = 255
_ADDR_RE = re.compile(r"^[^@\s<>,]+@([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)$")
_NAMED_ADDR_RE = re.compile(r"^\s*(?:[^<>]*?)\s*<([^<>]+)>\s*$")


@dataclass(frozen=True)
class SentMessage:
    """One accepted send, as the sink understood it."""

    id: int
    sender: str
    to: tuple[str, ...]
    subject: str | None
    textbody: str | None
    htmlbody: str | None
    tags: tuple[str, ...]
    idempotency_key: str | None
    domain: str


@dataclass
class _Fault:
    status: int
    times: int
    retry_after: float | None


def _address_domain(value: str) -> str | None:
    """``a@b.c`` or ``Name <a@b.c>`` -> ``b.c`` (lowercase); None if unparseable."""
    named = _NAMED_ADDR_RE.match(value)
    address = named.group(1).strip() if named else value.strip()
    match = _ADDR_RE.match(address)
    return match.group(1).lower() if match else None


class MailPaceSink:
    """``MailPaceSink(tokens)`` maps each server token to the domain it may send from.
    Use as a context manager; ``base_url`` ends in ``/api/v1``."""

    def __init__(self, tokens: Mapping[str, str], *, print_messages: bool = False) -> None:
        self._tokens = {token: domain.lower() for token, domain in tokens.items()}
        self._print = print_messages
        self._lock = threading.Lock()
        self._messages: list[SentMessage] = []
        self._replies: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._faults: list[_Fault] = []
        self._next_id = 1
        self.requests_seen = 0
        self._server: BackgroundHttpServer | None = None
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> MailPaceSink:
        self._start(0)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _start(self, port: int) -> None:
        sink = self

        class Handler(_Handler):
            owner = sink

        self._server = BackgroundHttpServer(Handler, port)
        self._port = self._server.port

    def _stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/v1"

    # -- test helpers ----------------------------------------------------------------------

    @property
    def messages(self) -> list[SentMessage]:
        with self._lock:
            return list(self._messages)

    def inject_fault(
        self, status: int, times: int = 1, *, retry_after: float | None = None
    ) -> None:
        """The next ``times`` sends answer ``status`` (429 with the documented message,
        500 with an empty body, anything else with ``{"error": ...}``) and send nothing."""
        with self._lock:
            self._faults.append(_Fault(status, times, retry_after))

    def go_down(self) -> None:
        """Stop listening: connections are refused until ``come_up``."""
        self._stop()

    def come_up(self) -> None:
        """Listen again on the same port."""
        if self._server is None:
            self._start(self._port)

    # -- request handling ------------------------------------------------------------------

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def handle_send(
        self, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        """Validate one send request; returns (status, body, extra headers)."""
        with self._lock:
            self.requests_seen += 1
        fault = self._take_fault()
        if fault is not None:
            extra = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            if fault.status == 500:
                return 500, b"", extra
            message = (
                "You are sending emails too quickly" if fault.status == 429 else "injected fault"
            )
            return fault.status, _error(message), extra

        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        accept = headers.get("accept", "")
        if content_type != "application/json" or "application/json" not in accept:
            return 406, _error("Invalid format or content type, use application/json"), {}
        token = headers.get("mailpace-server-token")
        if not token:
            return 401, _error("Missing API Token"), {}
        domain = self._tokens.get(token)
        if domain is None:
            return 400, _error("Invalid API Token"), {}
        key = headers.get("idempotency-key")
        if key is not None and (not key or len(key) > _MAX_IDEMPOTENCY_KEY):
            return 400, _error("Idempotency-Key must be 1 to 255 characters"), {}
        if key is not None:
            with self._lock:
                stored = self._replies.get((token, key))
            if stored is not None:
                return stored[0], stored[1], {}

        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return 400, _error("Request body is not valid JSON"), {}
        if not isinstance(body, dict):
            return 400, _error("Request body must be a JSON object"), {}
        status, reply, fields = self._validate(body, domain, key)
        if fields is None:
            return status, reply, {}
        with self._lock:
            # A concurrent replay may have stored first: answer as that one did.
            if key is not None and (token, key) in self._replies:
                first = self._replies[(token, key)]
                return first[0], first[1], {}
            message_id = self._next_id
            self._next_id += 1
            sent = SentMessage(id=message_id, **fields)
            self._messages.append(sent)
            reply = json.dumps({"id": message_id, "status": "pending"}).encode()
            if key is not None:
                self._replies[(token, key)] = (200, reply)
        if self._print:
            _print_message(sent)
        return 200, reply, {}

    def _validate(
        self, body: dict[str, Any], domain: str, key: str | None
    ) -> tuple[int, bytes, dict[str, Any] | None]:
        sender = body.get("from")
        if not isinstance(sender, str) or _address_domain(sender) is None:
            return 400, _errors("from", "is invalid or missing"), None
        if _address_domain(sender) != domain:
            return 403, _error(f"From domain does not match this token's domain {domain}"), None
        to_field = body.get("to")
        if not isinstance(to_field, str) or not to_field.strip():
            return 400, _errors("to", "undefined field"), None
        recipients = [part.strip() for part in to_field.split(",") if part.strip()]
        if len(recipients) > _MAX_RECIPIENTS:
            return 400, _errors("to", "Number of email addresses exceeds maximum (50)"), None
        if any(_address_domain(address) is None for address in recipients):
            return 400, _errors("to", "is invalid"), None
        textbody, htmlbody = body.get("textbody"), body.get("htmlbody")
        if not textbody and not htmlbody:
            return 400, _errors("htmlbody or textbody", "cannot both be empty"), None
        for name in ("textbody", "htmlbody", "subject"):
            if body.get(name) is not None and not isinstance(body.get(name), str):
                return 400, _errors(name, "must be a string"), None
        tags = body.get("tags", [])
        if isinstance(tags, str):
            tags = [tags]
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            return 400, _errors("tags", "must be a string or an array of strings"), None
        message = {
            "sender": sender,
            "to": tuple(recipients),
            "subject": body.get("subject"),
            "textbody": textbody,
            "htmlbody": htmlbody,
            "tags": tuple(tags),
            "idempotency_key": key,
            "domain": domain,
        }
        return 200, b"", message


def _error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _errors(field: str, message: str) -> bytes:
    return json.dumps({"errors": {field: [message]}}).encode()


def _print_message(message: SentMessage) -> None:
    print(f"--- MailPace sink: message {message.id} ---")
    print(f"From: {message.sender}")
    print(f"To: {', '.join(message.to)}")
    print(f"Subject: {message.subject or ''}")
    print(f"Tags: {', '.join(message.tags)}")
    print()
    print(message.textbody or message.htmlbody or "")
    print("--- end of message ---", flush=True)


class _Handler(BaseHTTPRequestHandler):
    owner: MailPaceSink
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output is the sink's ``messages``."""

    def _answer(self, status: int, body: bytes, extra: Mapping[str, str]) -> None:
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.split("?")[0] != "/api/v1/send":
            self._answer(404, _error("Not found"), {})
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, body, extra = self.owner.handle_send(headers, raw)
        self._answer(status, body, extra)

    def do_GET(self) -> None:
        self._answer(404, _error("Not found"), {})
