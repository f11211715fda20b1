"""A real BIND 9 on a loopback port, for the RFC 2136 provider and propagation tests.

``BindServer`` writes a named.conf and one zone file per zone into ``workdir``, starts
``named -g`` (foreground, logs to a file in ``workdir``), waits until it answers SOA for
every zone, and stops the process it started on exit. Updates are allowed only when
signed with the TSIG key given here.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from emulators.processes import stop_process

_NAME_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9-]+$")
_ALGORITHMS = frozenset(
    {"hmac-md5", "hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512"}
)
_START_TIMEOUT = 15.0
_START_ATTEMPTS = 3


class BindError(RuntimeError):
    """named could not be found, configured or started."""


def generate_tsig_secret(nbytes: int = 32) -> str:
    """A fresh TSIG secret, base64 as ``tsig-keygen`` prints it (256 bits for hmac-sha256)."""
    return base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def find_named() -> str:
    """``named`` from PATH, else Debian's /usr/sbin/named (sbin is often not on PATH)."""
    found = shutil.which("named")
    if found:
        return found
    for candidate in ("/usr/sbin/named", "/usr/local/sbin/named"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BindError("named (BIND 9) not found on PATH or in /usr/sbin; install bind9")


def _free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` right now (named needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                return port
    raise BindError(f"no free TCP+UDP port on {host}")


def _check_name(kind: str, name: str) -> str:
    name = name.rstrip(".").lower()
    if not _NAME_RE.match(name):
        raise BindError(f"{kind} {name!r} is not a valid DNS name")
    return name


class BindServer:
    """Authoritative BIND 9 for ``zones`` on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        workdir: Path,
        zones: Sequence[str],
        *,
        tsig_name: str,
        tsig_secret_b64: str,
        tsig_algorithm: str = "hmac-sha256",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not zones:
            raise BindError("at least one zone is needed")
        if tsig_algorithm not in _ALGORITHMS:
            raise BindError(f"unsupported TSIG algorithm {tsig_algorithm!r}")
        try:
            base64.b64decode(tsig_secret_b64, validate=True)
        except ValueError as exc:
            raise BindError("TSIG secret is not valid base64") from exc
        self.workdir = Path(workdir)
        self.zones = [_check_name("zone", z) for z in zones]
        self.tsig_name = _check_name("TSIG key name", tsig_name)
        self._tsig_secret_b64 = tsig_secret_b64
        self.tsig_algorithm = tsig_algorithm
        self.host = host
        self._requested_port = port
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "named.log"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -- configuration ---------------------------------------------------------------

    def _zone_file(self, zone: str) -> str:
        # One NS whose glue points at the loopback host; TTL 60 as the renewer uses.
        return (
            "$TTL 60\n"
            f"@ IN SOA ns1.{zone}. hostmaster.{zone}. ( 1 3600 600 86400 60 )\n"
            f"@ IN NS ns1.{zone}.\n"
            f"ns1 IN A {self.host}\n"
        )

    def _named_conf(self) -> str:
        wd = str(self.workdir)
        key = self.tsig_name
        lines = [
            "options {",
            f'  directory "{wd}";',
            f'  pid-file "{wd}/named.pid";',
            f'  session-keyfile "{wd}/session.key";',
            f'  managed-keys-directory "{wd}";',
            f"  listen-on port {self.port} {{ {self.host}; }};",
            "  listen-on-v6 { none; };",
            "  recursion no;",
            "  allow-recursion { none; };",
            "  allow-transfer { none; };",
            "  dnssec-validation no;",
            "  notify no;",
            "};",
            # No rndc control channel: we stop the process by its pid.
            "controls { };",
            f'key "{key}" {{',
            f"  algorithm {self.tsig_algorithm};",
            f'  secret "{self._tsig_secret_b64}";',
            "};",
        ]
        for zone in self.zones:
            lines += [
                f'zone "{zone}" {{',
                "  type primary;",
                f'  file "{wd}/{zone}.db";',
                f'  allow-update {{ key "{key}"; }};',
                "};",
            ]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for zone in self.zones:
            (self.workdir / f"{zone}.db").write_text(self._zone_file(zone))
            with contextlib.suppress(FileNotFoundError):
                (self.workdir / f"{zone}.db.jnl").unlink()
        conf = self.workdir / "named.conf"
        conf.write_text(self._named_conf())
        conf.chmod(0o600)  # it holds the TSIG secret
        return conf

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> BindServer:
        named = find_named()
        last_error = ""
        for _ in range(_START_ATTEMPTS):
            self.port = self._requested_port or _free_port(self.host)
            conf = self._write_config()
            # -g: foreground, log to stderr; -4: IPv4 only; -n 1: one worker is plenty.
            # Root needs no -u here: the workdir belongs to us and nothing is privileged.
            argv = [named, "-g", "-4", "-n", "1", "-c", str(conf)]
            with self.log_path.open("wb") as log:
                self._proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_ready():
                return self
            last_error = self._log_tail()
            self.stop()
            if self._requested_port:
                break
        raise BindError(f"named did not start on {self.host}:{self.port}:\n{last_error}")

    def _answers_soa(self, zone: str) -> bool:
        query = dns.message.make_query(zone, dns.rdatatype.SOA)
        try:
            resp = dns.query.udp(query, self.host, port=self.port, timeout=0.2)
        except (dns.exception.DNSException, OSError):
            return False
        return resp.rcode() == dns.rcode.NOERROR and bool(resp.flags & dns.flags.AA)

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        pending = list(self.zones)
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            pending = [z for z in pending if not self._answers_soa(z)]
            if not pending:
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> BindServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
