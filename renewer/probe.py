"""What a live SMTP endpoint serves: STARTTLS on 25/587, implicit TLS on 465.

DESIGN.md ("decide", "verify"): the job reads the certificate an endpoint presents, over
the same protocol a sending MTA uses. The handshake does not verify anything (Python's
``ssl`` cannot hand back an unverified chain, so this uses pyOpenSSL): a self-signed,
expired or wrong-name certificate is *reported* by the caller, not raised here.

Endpoints are untrusted (issue 5, "Untrusted answers"): every step is bounded by one
deadline, replies are size-limited, and anything that goes wrong becomes a ``ProbeError``
naming the endpoint, never another exception.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from OpenSSL import SSL

from renewer.certs import dns_names, serial_hex
from renewer.errors import ConfigError, ProbeError

log = logging.getLogger(__name__)

Mode = Literal["starttls", "tls"]

# DESIGN.md: 465 is implicit TLS, every other port STARTTLS.
IMPLICIT_TLS_PORT = 465

_MAX_LINE = 2048  # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; be generous
_MAX_LINES = 100
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$", re.IGNORECASE)
_REPLY = re.compile(rb"^(\d{3})([ -])(.*)$", re.DOTALL)


def default_mode(port: int) -> Mode:
    return "tls" if port == IMPLICIT_TLS_PORT else "starttls"


@dataclass(frozen=True)
class Endpoint:
    """An SMTP endpoint to probe: ``host:port`` with an optional ``/starttls`` or ``/tls``."""

    host: str
    port: int
    mode: Mode

    @classmethod
    def parse(cls, text: object, field: str = "endpoint") -> Endpoint:
        """Parse ``host:port[/starttls|/tls]``; IPv6 addresses in brackets (``[::1]:25``).

        ``field`` is the config path used in the error (e.g. ``certificates[0].endpoints[1]``).
        """
        expected = "expected host:port, optionally followed by /starttls or /tls"
        if not isinstance(text, str):
            raise ConfigError(field, f"{expected}, got {type(text).__name__}")
        if not text or len(text) > 300 or not text.isascii() or not text.isprintable():
            raise ConfigError(field, f"{expected} (ASCII, no spaces; IDNs in xn-- form)")
        base, slash, mode_text = text.partition("/")
        mode: Mode | None = None
        if slash:
            if mode_text not in ("starttls", "tls"):
                raise ConfigError(field, f"{expected}; unknown mode {mode_text!r}")
            mode = "tls" if mode_text == "tls" else "starttls"
        if base.startswith("["):
            host, bracket, rest = base[1:].partition("]")
            if not bracket or not rest.startswith(":"):
                raise ConfigError(field, f"{expected}; IPv6 addresses look like [::1]:25")
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(field, f"{expected}; {host!r} is not an IPv6 address") from None
        else:
            host, colon, port_text = base.rpartition(":")
            if not colon or not host:
                raise ConfigError(field, f"{expected}; the port is required")
            if ":" in host:
                raise ConfigError(field, f"{expected}; put IPv6 addresses in brackets")
            if not _valid_host(host):
                raise ConfigError(
                    field, f"{expected}; {host!r} is not a valid host name or address"
                )
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(field, f"{expected}; the port must be 1-65535")
        port = int(port_text)
        return cls(host=host.lower(), port=port, mode=mode or default_mode(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = "" if self.mode == default_mode(self.port) else f"/{self.mode}"
        return f"{host}:{self.port}{suffix}"


def _valid_host(host: str) -> bool:
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        return False
    return all(_HOST_LABEL.match(label) for label in name.split("."))


@dataclass(frozen=True)
class ServedCertificate:
    """What an endpoint presented: the leaf and the rest of the chain, as sent."""

    # An endpoint, or a label such as "dotenv smtp.env" for a certificate read from a file.
    endpoint: Endpoint | str
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]


class _Conversation:
    """A plain-text SMTP dialogue on a socket, every wait bounded by ``deadline``."""

    def __init__(
        self, endpoint: Endpoint, sock: socket.socket, timeout: float, deadline: float
    ) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.timeout = timeout
        self.deadline = deadline
        self.buffer = b""

    def remaining(self, doing: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProbeError(f"{self.endpoint}: no answer within {self.timeout:g}s while {doing}")
        return left

    def send(self, line: str) -> None:
        self.sock.settimeout(self.remaining(f"sending {line}"))
        self.sock.sendall(line.encode("ascii") + b"\r\n")

    def _read_line(self, doing: str) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                raise ProbeError(f"{self.endpoint}: reply line too long while {doing}")
            self.sock.settimeout(self.remaining(doing))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError as exc:
                raise ProbeError(
                    f"{self.endpoint}: no answer within {self.timeout:g}s while {doing}"
                ) from exc
            if not chunk:
                raise ProbeError(f"{self.endpoint}: connection closed while {doing}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self, doing: str) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: its code and its text lines."""
        lines: list[str] = []
        codes: set[int] = set()
        for _ in range(_MAX_LINES):
            raw = self._read_line(doing)
            match = _REPLY.match(raw)
            if match is not None:
                codes.add(int(match.group(1)))
            if match is None or len(codes) > 1:
                raise ProbeError(f"{self.endpoint}: not an SMTP reply while {doing}: {_shown(raw)}")
            code = int(match.group(1))
            lines.append(match.group(3).decode("ascii", "replace"))
            if match.group(2) == b" ":
                return code, lines
        raise ProbeError(f"{self.endpoint}: reply with too many lines while {doing}")


def _shown(raw: bytes) -> str:
    """A short, printable rendering of untrusted bytes for an error message."""
    text = raw[:80].decode("ascii", "backslashreplace")
    return repr(text + ("..." if len(raw) > 80 else ""))


def probe_endpoint(endpoint: Endpoint, sni: str, *, timeout: float = 10.0) -> ServedCertificate:
    """Connect to ``endpoint``, negotiate TLS (sending ``sni``) and return what it presents.

    The whole probe (connect, SMTP dialogue, handshake) finishes within ``timeout``
    seconds. Raises ``ProbeError`` naming the endpoint on any failure.
    """
    deadline = time.monotonic() + timeout  # one budget for the whole probe
    doing = "connecting"
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except ConnectionRefusedError as exc:
        raise ProbeError(f"{endpoint}: connection refused") from exc
    except TimeoutError as exc:
        raise ProbeError(f"{endpoint}: no answer within {timeout:g}s while connecting") from exc
    except socket.gaierror as exc:
        raise ProbeError(f"{endpoint}: cannot resolve {endpoint.host}: {exc.strerror}") from exc
    except (OSError, ValueError) as exc:  # ValueError: a host name the resolver refuses
        raise ProbeError(f"{endpoint}: cannot connect: {_os_reason(exc)}") from exc
    talk = _Conversation(endpoint, sock, timeout, deadline)
    try:
        if endpoint.mode == "starttls":
            doing = "negotiating STARTTLS"
            _starttls(talk)
        doing = "in the TLS handshake"
        tls = _handshake(talk, sni)
        served = _served(endpoint, tls)
        _quit_politely(talk, tls)
        log.debug(
            "%s serves %s (serial %s, %d more in chain)",
            endpoint,
            ", ".join(dns_names(served.leaf)) or "a certificate without DNS names",
            serial_hex(served.leaf),
            len(served.chain),
        )
        return served
    except ProbeError:
        raise
    except TimeoutError as exc:
        raise ProbeError(f"{endpoint}: no answer within {timeout:g}s while {doing}") from exc
    except SSL.Error as exc:
        raise ProbeError(f"{endpoint}: TLS handshake failed: {_ssl_reason(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise ProbeError(f"{endpoint}: connection failed while {doing}: {_os_reason(exc)}") from exc
    finally:
        sock.close()


def _os_reason(exc: Exception) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


def _starttls(talk: _Conversation) -> None:
    code, lines = talk.reply("waiting for the greeting")
    if code != 220:
        raise ProbeError(f"{talk.endpoint}: greeting {code} {_first(lines)}, expected 220")
    local = talk.sock.getsockname()[0]
    literal = f"[IPv6:{local}]" if ":" in local else f"[{local}]"  # RFC 5321 4.1.3
    talk.send(f"EHLO {literal}")
    code, lines = talk.reply("waiting for the EHLO reply")
    if code != 250:
        raise ProbeError(f"{talk.endpoint}: EHLO answered {code} {_first(lines)}")
    if not any(line.split(" ", 1)[0].upper() == "STARTTLS" for line in lines[1:]):
        _quit_plain(talk)
        raise ProbeError(f"{talk.endpoint}: does not offer STARTTLS")
    talk.send("STARTTLS")
    code, lines = talk.reply("waiting for the STARTTLS reply")
    if code != 220:
        raise ProbeError(f"{talk.endpoint}: STARTTLS answered {code} {_first(lines)}")
    if talk.buffer:
        # RFC 3207 5: bytes after the 220 would be injected into the TLS session.
        raise ProbeError(f"{talk.endpoint}: sent unexpected data after STARTTLS 220")


def _first(lines: list[str]) -> str:
    return _shown(lines[0].encode()) if lines else "''"


def _quit_plain(talk: _Conversation) -> None:
    try:
        talk.send("QUIT")
        talk.reply("waiting for the QUIT reply")
    except (ProbeError, OSError):
        pass  # politeness only


def _handshake(talk: _Conversation, sni: str) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    # No verification here on purpose: the caller judges the chain (docstring above).
    context.set_verify(SSL.VERIFY_NONE)
    tls = SSL.Connection(context, talk.sock)
    if sni and sni.isascii() and not _is_ip(sni):  # RFC 6066 3: no addresses in SNI
        tls.set_tlsext_host_name(sni.encode("ascii"))
    tls.set_connect_state()
    talk.sock.setblocking(False)
    try:
        _tls_io(talk, tls.do_handshake)
        return tls
    except (SSL.ZeroReturnError, SSL.SysCallError) as exc:
        raise ProbeError(f"{talk.endpoint}: connection closed during the TLS handshake") from exc


def _wait(talk: _Conversation, *, readable: bool) -> None:
    left = talk.remaining("in the TLS handshake")
    reads, writes = ([talk.sock], []) if readable else ([], [talk.sock])
    ready = select.select(reads, writes, [], left)
    if not any(ready):
        raise ProbeError(
            f"{talk.endpoint}: no answer within {talk.timeout:g}s while in the TLS handshake"
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _ssl_reason(exc: SSL.Error) -> str:
    # pyOpenSSL's args: [[(library, function, reason), ...]]
    try:
        reasons = [str(entry[-1]) for entry in exc.args[0]]
    except (IndexError, TypeError):
        return str(exc) or type(exc).__name__
    return "; ".join(reasons) or type(exc).__name__


def _served(endpoint: Endpoint, tls: SSL.Connection) -> ServedCertificate:
    leaf = tls.get_peer_certificate(as_cryptography=True)
    chain = tls.get_peer_cert_chain(as_cryptography=True) or []
    if leaf is None:
        raise ProbeError(f"{endpoint}: presented no certificate")
    # On the client side OpenSSL's peer chain starts with the leaf; keep the rest as sent.
    rest = chain[1:] if chain and chain[0] == leaf else chain
    return ServedCertificate(endpoint=endpoint, leaf=leaf, chain=tuple(rest))


def _quit_politely(talk: _Conversation, tls: SSL.Connection) -> None:
    """Say QUIT inside TLS and close; failures here do not matter (we have the cert)."""
    # At most a second of politeness, and never past the probe's own deadline.
    talk.deadline = min(talk.deadline, time.monotonic() + 1.0)
    try:
        if talk.endpoint.mode == "tls":
            _tls_io(talk, lambda: tls.recv(_MAX_LINE))  # 465: the greeting follows the handshake
        _tls_io(talk, lambda: tls.send(b"QUIT\r\n"))
        _tls_io(talk, lambda: tls.recv(_MAX_LINE))
        tls.shutdown()
    except (SSL.Error, OSError, ProbeError):
        pass


def _tls_io(talk: _Conversation, operation: Callable[[], object]) -> None:
    """Run a pyOpenSSL operation on the non-blocking socket, waiting as OpenSSL asks."""
    while True:
        try:
            operation()
            return
        except SSL.WantReadError:
            _wait(talk, readable=True)
        except SSL.WantWriteError:
            _wait(talk, readable=False)
