"""A tiny HTTPS proxy in front of Pebble that answers chosen requests with ACME problems
Pebble cannot produce on demand: ``rateLimited`` (HTTP 429 with Retry-After, RFC 8555
6.6), HTTP 503 with Retry-After, and ARI's ``alreadyReplaced`` (409, RFC 9773 5).

Everything else is forwarded to Pebble unchanged, Host header included: Pebble builds
its URLs (directory, Location, JWS ``url`` check) from the Host it is asked for, so the
client keeps talking to the proxy for the whole order. The proxy serves Pebble's own
HTTPS certificate, so the test CA bundle trusts it.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from emulators.pebble import PebbleServer

PROBLEM = "urn:ietf:params:acme:error:"
_HOP_BY_HOP = frozenset(
    {"connection", "transfer-encoding", "keep-alive", "content-length", "date", "server"}
)


@dataclass
class AcmeFault:
    """Answer the next ``times`` matching requests with ``status`` and a problem document.
    ``payload_key``: only requests whose JWS payload has that key (e.g. ``replaces``)."""

    method: str
    path: str  # regex, re.search on the path
    status: int
    problem: str  # e.g. "rateLimited"
    retry_after: int | None = None  # delay-seconds is an integer (RFC 9110 10.2.3)
    times: int = 1
    payload_key: str | None = None
    detail: str = "injected by the test proxy"

    def matches(self, method: str, path: str, payload: dict[str, Any] | None) -> bool:
        if self.times <= 0 or self.method not in ("*", method):
            return False
        if not re.search(self.path, path):
            return False
        return self.payload_key is None or (payload is not None and self.payload_key in payload)


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    status: int
    faulted: bool
    payload_keys: tuple[str, ...] = ()


@dataclass
class AcmeFaultProxy:
    """``with AcmeFaultProxy(pebble) as proxy``: ``proxy.directory_url`` replaces Pebble's."""

    pebble: PebbleServer
    faults: list[AcmeFault] = field(default_factory=list)
    log: list[ProxiedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> AcmeFaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        workdir = self.pebble.workdir
        context.load_cert_chain(workdir / "https-cert.pem", workdir / "https-key.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def inject(self, fault: AcmeFault) -> None:
        with self._lock:
            self.faults.append(fault)

    def requests(self, path: str = "") -> list[ProxiedRequest]:
        with self._lock:
            return [r for r in self.log if re.search(path, r.path)]

    def take_fault(
        self, method: str, path: str, payload: dict[str, Any] | None
    ) -> AcmeFault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path, payload):
                    fault.times -= 1
                    return fault
        return None

    def record(self, entry: ProxiedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        context = ssl.create_default_context(cafile=str(self.pebble.https_ca_path))
        host, port = self.pebble.directory_url.split("/")[2].rsplit(":", 1)
        connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
        try:
            connection.request(method, target, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()


def jws_payload(body: bytes) -> dict[str, Any] | None:
    """The decoded payload of a flattened JWS request body, or None."""
    try:
        jws = json.loads(body)
        raw = jws["payload"]
        if not raw:
            return None
        decoded = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return decoded if isinstance(decoded, dict) else None


class _Handler(BaseHTTPRequestHandler):
    owner: AcmeFaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        payload = jws_payload(body) if self.command == "POST" else None
        keys = tuple(sorted(payload)) if payload else ()
        fault = self.owner.take_fault(self.command, path, payload)
        if fault is not None:
            problem = {
                "type": PROBLEM + fault.problem,
                "detail": fault.detail,
                "status": fault.status,
            }
            data = json.dumps(problem).encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/problem+json")
            if fault.retry_after is not None:
                self.send_header("Retry-After", str(fault.retry_after))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.owner.record(ProxiedRequest(self.command, path, fault.status, True, keys))
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        status, answer_headers, data = self.owner.forward(self.command, self.path, headers, body)
        self.send_response(status)
        for name, value in answer_headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.owner.record(ProxiedRequest(self.command, path, status, False, keys))

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()
