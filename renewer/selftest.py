"""The pre-deployment TLS self-test (DESIGN.md, "validate"): a real STARTTLS handshake
against a local SMTP server loaded from exactly the encoded values that will be deployed.

The server is aiosmtpd in this process, on 127.0.0.1 and a free port, and the key never
touches a disk: Python's ``ssl`` only loads keys from a path, so the PEM goes into an
anonymous memory file (``memfd_create``) that is opened through ``/proc/self/fd``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import ssl
import threading
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType

from aiosmtpd.smtp import SMTP
from cryptography import x509

from renewer.certs import fingerprint_sha256, load_pem_chain, verify_chain
from renewer.errors import CertificateInvalidError, ProbeError
from renewer.probe import Endpoint, probe_endpoint
from renewer.sensitive import Secret

log = logging.getLogger(__name__)

_SERVER_NAME = "selftest.invalid"  # our EHLO greeting name; avoids a slow getfqdn()


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


class _Discard:
    """Accept and drop any message: enough to be an ordinary SMTP server."""

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:  # noqa: N802
        return "250 OK"


class _LoopbackStarttlsServer:
    """aiosmtpd on 127.0.0.1:0 with STARTTLS, its event loop in a thread of its own."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def _protocol(self) -> SMTP:
        return SMTP(_Discard(), hostname=_SERVER_NAME, tls_context=self._context, loop=self._loop)

    def __enter__(self) -> _LoopbackStarttlsServer:
        try:
            self._server = self._loop.run_until_complete(
                self._loop.create_server(self._protocol, host="127.0.0.1", port=0)
            )
        except BaseException:
            self._loop.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        assert self._server is not None
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()


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
