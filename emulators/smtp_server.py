"""A real SMTP server on loopback that takes its certificate the way a Fly SMTP app does:
``PRIVATEKEY`` and ``FULLCHAIN`` hold ``base64 -w 0`` of the PEM files (DESIGN.md,
"Secrets"), from the environment or from a dotenv file (``KEY=value`` lines).

Listeners are (port, mode) pairs: ``starttls`` (25/587 style) or ``tls`` (implicit, 465).
Used by the Fly emulator's machines, the demo and the tests, in two ways:

- in-process: ``with SmtpServer([(0, "starttls"), (0, "tls")], key_b64, chain_b64) as s:``
  (port 0 picks free ports, see ``s.ports``; ``s.reload(...)`` swaps the certificate);
- as a process: ``python -m emulators.smtp_server --listen 127.0.0.1:2525/starttls
  --listen 127.0.0.1:4650/tls [--env-file FILE] [--key-var PRIVATEKEY] [--chain-var
  FULLCHAIN] [--ready-file F]``; SIGHUP re-reads the certificate, SIGTERM stops.

Without a certificate it starts with a self-signed placeholder, like a fresh SMTP app
whose secrets are not set yet, and says so in its log. Mail is accepted and discarded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import Literal

from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from renewer.certs import fingerprint_sha256, load_pem_chain
from renewer.errors import CertificateInvalidError
from renewer.selftest import decode_b64_pem, ssl_server_context

log = logging.getLogger(__name__)

Mode = Literal["starttls", "tls"]
PLACEHOLDER_NAME = "placeholder.invalid"


@dataclass(frozen=True)
class Credentials:
    """A loaded certificate: the TLS context and what it serves."""

    context: ssl.SSLContext
    fingerprint: str
    placeholder: bool


def placeholder_pems() -> tuple[bytes, bytes]:
    """A fresh self-signed key and certificate (PEM) for a server with no secrets yet."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, PLACEHOLDER_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "placeholder: certificate not set"),
        ]
    )
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(PLACEHOLDER_NAME)]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def load_credentials(key_b64: str | None, chain_b64: str | None) -> Credentials:
    """Load the base64 PEM values exactly as deployed; a placeholder when either is unset.

    Raises ``CertificateInvalidError`` when values are set but unusable (a real app
    would refuse to start too).
    """
    if not key_b64 or not chain_b64:
        key_pem, chain_pem = placeholder_pems()
        placeholder = True
    else:
        key_pem = decode_b64_pem(key_b64, "the private key value")
        chain_pem = decode_b64_pem(chain_b64, "the certificate chain value")
        placeholder = False
    context = ssl_server_context(key_pem, chain_pem)
    fingerprint = fingerprint_sha256(load_pem_chain(chain_pem)[0])
    return Credentials(context=context, fingerprint=fingerprint, placeholder=placeholder)


class _Discard:
    """Accept and drop every message, like a normal server would accept it."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
        return "250 OK: message accepted (discarded)"


class SmtpServer:
    """aiosmtpd listeners on ``host``, run by an event loop in a thread of their own."""

    def __init__(
        self,
        listeners: Sequence[tuple[int, Mode]],
        key_b64: str | None,
        chain_b64: str | None,
        host: str = "127.0.0.1",
    ) -> None:
        if not listeners:
            raise ValueError("at least one listener is needed")
        self.listeners = list(listeners)
        self.host = host
        self.ports: list[int] = []
        self._credentials = self._load(key_b64, chain_b64)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[asyncio.Server] = []

    @staticmethod
    def _load(key_b64: str | None, chain_b64: str | None) -> Credentials:
        credentials = load_credentials(key_b64, chain_b64)
        if credentials.placeholder:
            log.warning(
                "no certificate configured (key or chain value empty): serving a "
                "self-signed placeholder for %s until one is set",
                PLACEHOLDER_NAME,
            )
        return credentials

    @property
    def fingerprint(self) -> str:
        return self._credentials.fingerprint

    @property
    def placeholder(self) -> bool:
        return self._credentials.placeholder

    def reload(self, key_b64: str | None, chain_b64: str | None) -> str:
        """Serve a new certificate to every new connection; returns its fingerprint.

        On unusable values the old certificate stays and the error is raised."""
        self._credentials = self._load(key_b64, chain_b64)
        log.info("certificate reloaded: now serving %s", self._credentials.fingerprint)
        return self._credentials.fingerprint

    def _select_current(
        self, tls: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        # Runs at every ClientHello of an implicit-TLS listener: hand the connection the
        # certificate that is current now, so a reload needs no new listening socket.
        tls.context = self._credentials.context

    def _starttls_protocol(self) -> SMTP:
        return SMTP(
            _Discard(),
            hostname="smtp.emulator.invalid",
            tls_context=self._credentials.context,
            loop=self._loop,
        )

    def _tls_protocol(self) -> SMTP:
        return SMTP(_Discard(), hostname="smtp.emulator.invalid", loop=self._loop)

    async def _start(self) -> None:
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        front.sni_callback = self._select_current
        for port, mode in self.listeners:
            if mode == "starttls":
                server = await self._loop.create_server(
                    self._starttls_protocol, host=self.host, port=port
                )
            else:
                server = await self._loop.create_server(
                    self._tls_protocol, host=self.host, port=port, ssl=front
                )
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    def start(self) -> SmtpServer:
        try:
            self._loop.run_until_complete(self._start())
        except BaseException:
            self._close_loop()
            raise
        self._thread.start()
        for (_, mode), port in zip(self.listeners, self.ports, strict=True):
            log.info("SMTP listening on %s:%d (%s)", self.host, port, mode)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._close_loop()

    def _close_loop(self) -> None:
        for server in self._servers:
            server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        for server in self._servers:
            self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------- process mode


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (optional ``export``, quotes, ``#`` comments); missing -> empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or "=" not in stripped:
            continue
        key, _, value = stripped.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _listen_arg(text: str) -> tuple[str, int, Mode]:
    base, _, mode = text.partition("/")
    host, colon, port = base.rpartition(":")
    if not colon or not port.isdigit() or mode not in ("", "starttls", "tls"):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT[/starttls|/tls], got {text!r}")
    port_number = int(port)
    chosen: Mode = "tls" if mode == "tls" or (not mode and port_number == 465) else "starttls"
    return host.strip("[]") or "127.0.0.1", port_number, chosen


def _values(args: argparse.Namespace) -> tuple[str | None, str | None]:
    source: Mapping[str, str] = read_env_file(args.env_file) if args.env_file else os.environ
    return source.get(args.key_var) or None, source.get(args.chain_var) or None


def _announce(server: SmtpServer, ready_file: Path | None) -> None:
    listening = [
        f"{server.host}:{port}/{mode}"
        for (_, mode), port in zip(server.listeners, server.ports, strict=True)
    ]
    if ready_file is not None:
        state = {
            "pid": os.getpid(),
            "host": server.host,
            "ports": server.ports,
            "listeners": listening,
            "fingerprint": server.fingerprint,
            "placeholder": server.placeholder,
        }
        partial = ready_file.with_name(ready_file.name + ".tmp")
        partial.write_text(json.dumps(state))
        partial.replace(ready_file)  # readers never see half a file
    print(f"READY {' '.join(listening)} fingerprint={server.fingerprint}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.smtp_server")
    parser.add_argument("--listen", action="append", type=_listen_arg, required=True)
    parser.add_argument("--env-file", type=Path)
    parser.add_argument("--key-var", default="PRIVATEKEY")
    parser.add_argument("--chain-var", default="FULLCHAIN")
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="smtp-server: %(levelname)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    hosts = {host for host, _, _ in args.listen}
    if len(hosts) != 1:
        parser.error("all --listen addresses must use the same host")
    listeners: list[tuple[int, Mode]] = [(port, mode) for _, port, mode in args.listen]

    wake = threading.Event()
    pending: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)
        wake.set()

    for handled in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, on_signal)
    try:
        server = SmtpServer(listeners, *_values(args), host=hosts.pop())
    except CertificateInvalidError as exc:
        log.error("cannot start: %s", exc)
        return 2
    with server:
        _announce(server, args.ready_file)
        while True:
            wake.wait()
            wake.clear()
            while pending:
                signum = pending.pop(0)
                if signum != signal.SIGHUP:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    return 0
                try:
                    server.reload(*_values(args))
                except CertificateInvalidError as exc:
                    log.error("reload failed, still serving the old certificate: %s", exc)
                    continue
                with contextlib.suppress(OSError):
                    _announce(server, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
