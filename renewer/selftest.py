"""The pre-deployment TLS self-test (DESIGN.md, "validate"): a real STARTTLS handshake
against a local SMTP server loaded from exactly the encoded values that will be deployed.

The server is a small SMTP responder in a thread of this process, on 127.0.0.1 and a free
port, and the key never touches a disk: Python's ``ssl`` only loads keys from a path, so the
PEM goes into an anonymous memory file (``memfd_create``) opened through ``/proc/self/fd``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType

from cryptography import x509

from renewer.certs import fingerprint_sha256, load_pem_chain, verify_chain
from renewer.errors import CertificateInvalidError, ProbeError
from renewer.probe import Endpoint, probe_endpoint
from renewer.sensitive import Secret

log = logging.getLogger(__name__)

_SERVER_NAME = "selftest.invalid"  # our EHLO greeting name; avoids a slow getfqdn()
_MAX_COMMAND = 512  # RFC 5321 4.5.3.1.4: a command line is at most 512 octets


def decode_b64_pem(value: str, what: str) -> bytes:
    """Decode a deployed value (``base64 -w 0`` of a PEM file). ``what`` names it in
    errors; the value itself never appears in one."""
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertificateInvalidError(f"{what} is not valid base64") from exc
    if b"-----BEGIN " not in data:
        raise CertificateInvalidError(f"{what} does not decode to PEM")
    return data


def ssl_server_context(key_pem: bytes, chain_pem: bytes) -> ssl.SSLContext:
    """A TLS server context holding this key and chain, loaded without writing a file.

    Raises ``CertificateInvalidError`` when they cannot be loaded or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not hasattr(os, "memfd_create"):  # Linux only; the job runs in a Linux image
        raise CertificateInvalidError("cannot load a key without a file on this system")
    fd = os.memfd_create("tls-credentials", os.MFD_CLOEXEC)
    try:
        view = memoryview(chain_pem.rstrip(b"\n") + b"\n" + key_pem)
        while view:
            view = view[os.write(fd, view) :]
        # certfile holds chain then key; load_cert_chain takes the key from it too.
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        reason = exc.reason or "unreadable"
        if reason == "KEY_VALUES_MISMATCH":
            raise CertificateInvalidError("the private key does not match the certificate") from exc
        raise CertificateInvalidError(f"key or chain cannot be loaded by TLS ({reason})") from exc
    finally:
        os.close(fd)
    return context


class _LoopbackStarttlsServer:
    """An SMTP server on 127.0.0.1:0 offering STARTTLS (RFC 3207), in a thread of its own.

    It speaks the part of SMTP a client needs to reach TLS: the 220 greeting, EHLO/HELO
    (advertising STARTTLS), STARTTLS, the handshake with ``context``, then EHLO, NOOP,
    RSET and QUIT inside TLS; anything else is answered 502. Plain ``socket`` and
    ``ssl`` rather than aiosmtpd: importing aiosmtpd (asyncio, attrs) cost every run
    about 30 ms and 3.4 MB of peak memory (issue 6), for a server that serves one probe.
    """

    def __init__(self, context: ssl.SSLContext, timeout: float = 10.0) -> None:
        self._context = context
        self._timeout = timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def __enter__(self) -> _LoopbackStarttlsServer:
        try:
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(4)
        except BaseException:
            self._listener.close()
            raise
        self.port = self._listener.getsockname()[1]
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # shut down by __exit__
            with conn:
                conn.settimeout(self._timeout)
                # The probe reports what went wrong from its side; nothing to add here.
                with contextlib.suppress(OSError, ValueError):
                    self._converse(conn)

    def _converse(self, conn: socket.socket) -> None:
        with contextlib.ExitStack() as closing:  # the TLS socket, once there is one
            stream: socket.socket = conn
            buffer = b""
            stream.sendall(f"220 {_SERVER_NAME} ESMTP\r\n".encode())
            while True:
                while b"\n" not in buffer:
                    if len(buffer) > _MAX_COMMAND:
                        stream.sendall(b"500 5.5.2 Line too long\r\n")
                        return
                    data = stream.recv(4096)
                    if not data:
                        return
                    buffer += data
                line, buffer = buffer.split(b"\n", 1)
                verb = line.strip().split(b" ", 1)[0].upper()
                tls = stream is not conn
                if verb == b"EHLO":
                    offer = b"" if tls else b"250-STARTTLS\r\n"
                    stream.sendall(
                        b"250-" + _SERVER_NAME.encode() + b"\r\n" + offer + b"250 8BITMIME\r\n"
                    )
                elif verb == b"HELO":
                    stream.sendall(b"250 " + _SERVER_NAME.encode() + b"\r\n")
                elif verb == b"STARTTLS" and not tls:
                    if buffer:  # RFC 3207 5: nothing may follow STARTTLS before our 220
                        stream.sendall(b"501 5.5.4 Nothing may follow STARTTLS\r\n")
                        return
                    stream.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    stream = closing.enter_context(
                        self._context.wrap_socket(conn, server_side=True)
                    )
                elif verb in (b"NOOP", b"RSET"):
                    stream.sendall(b"250 2.0.0 OK\r\n")
                elif verb == b"QUIT":
                    stream.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    stream.sendall(b"502 5.5.1 Command not implemented\r\n")


def handshake_selftest(
    key_b64: Secret,
    chain_b64: str,
    sni: str,
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
    timeout: float = 10.0,
    use_system_roots: bool = True,
) -> str:
    """Serve the encoded key and chain over STARTTLS locally, probe it, and check it.

    Checks that the handshake works, that the served leaf is the chain's leaf, and that
    the served chain verifies to ``roots`` (plus the system roots unless told otherwise)
    for ``sni``. Returns the served leaf's SHA-256 fingerprint; raises
    ``CertificateInvalidError`` with the reason otherwise. The server is always stopped.
    """
    key_pem = decode_b64_pem(key_b64.reveal(), "the private key value")
    chain_pem = decode_b64_pem(chain_b64, "the certificate chain value")
    expected = load_pem_chain(chain_pem)[0]
    context = ssl_server_context(key_pem, chain_pem)
    with _LoopbackStarttlsServer(context) as server:
        endpoint = Endpoint("127.0.0.1", server.port, "starttls")
        try:
            served = probe_endpoint(endpoint, sni, timeout=timeout)
        except ProbeError as exc:
            raise CertificateInvalidError(f"TLS self-test failed: {exc}") from exc
    fingerprint = fingerprint_sha256(served.leaf)
    if fingerprint != fingerprint_sha256(expected):
        raise CertificateInvalidError(
            f"TLS self-test: the server presented {fingerprint}, "
            f"not the chain's leaf {fingerprint_sha256(expected)}"
        )
    verify_chain(
        served.leaf,
        served.chain,
        roots,
        now=now,
        use_system_roots=use_system_roots,
        name=sni,
    )
    log.info(
        "TLS self-test passed: STARTTLS on %s served %s (%d intermediate(s)), verified for %s",
        endpoint,
        fingerprint,
        len(served.chain),
        sni,
    )
    return fingerprint
