"""Runs Pebble 2.10+ (Let's Encrypt's ACME test CA) on loopback for tests and the demo.

Pebble makes new roots at every start, serves HTTPS only (with a certificate we make here)
and asks ``-dnsserver`` for DNS-01 TXT records (cloudflare-mailpace-acme.md E.2-E.5).
Pebble 2.10 is needed for ARI, profiles and ``alreadyReplaced`` (E.7); bookworm's 2.4.0
has none of them, so ``find_pebble`` refuses a binary without them.

Note on profiles: Pebble assigns a *random* profile to an order that names none ("in true
pebble chaos fashion", wfe.go). The default here is therefore a single profile, so an
order without a profile always gets 90 days; pass ``profiles=`` for profile tests.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulators.processes import stop_process

DAY = 86400
DEFAULT_PROFILES: Mapping[str, int] = {"default": 90 * DAY}
# Let's Encrypt's profiles (cloudflare-mailpace-acme.md D.3), for profile tests.
LETSENCRYPT_PROFILES: Mapping[str, int] = {
    "default": 90 * DAY,
    "tlsserver": 45 * DAY,
    "shortlived": 160 * 3600,
}
# A string only Pebble 2.10+ carries (the alreadyReplaced problem type, E.7).
_MARKER_2_10 = b"urn:ietf:params:acme:error:alreadyReplaced"
_INSTALL_HINT = "run scripts/install-pebble.sh"


class PebbleError(RuntimeError):
    """Pebble is missing, too old, or did not start."""


def find_pebble() -> Path:
    """``.tools/pebble/usr/bin/pebble`` under the repository, else a 2.10+ ``pebble`` on PATH."""
    local = Path(__file__).resolve().parents[1] / ".tools" / "pebble" / "usr" / "bin" / "pebble"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("pebble")
    if found is None:
        raise PebbleError(f"Pebble 2.10+ not found; {_INSTALL_HINT}")
    path = Path(found)
    if not _is_recent(path):
        raise PebbleError(f"{path} is older than Pebble 2.10 (no ARI/profiles); {_INSTALL_HINT}")
    return path


def _is_recent(path: Path) -> bool:
    try:
        out = subprocess.run(
            [str(path), "-version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    version = out.strip().rpartition(" ")[2].lstrip("v")
    parts = version.split(".")
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
        return (int(parts[0]), int(parts[1])) >= (2, 10)
    # Distribution builds print "dev": look at what the binary can do instead.
    try:
        return _MARKER_2_10 in path.read_bytes()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_https_certs(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for 127.0.0.1/localhost: Pebble's HTTPS listeners."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cert-renewer test HTTPS CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = workdir / "https-ca.pem"
    cert_path = workdir / "https-cert.pem"
    key_path = workdir / "https-key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class PebbleServer:
    """Pebble on 127.0.0.1 free ports, asking ``dns_server`` for DNS-01. Context manager.

    Knobs (E.4): ``nonce_reject`` percent of nonces refused (Pebble's default is 5; ours
    is 0 so that only tests of badNonce see them), ``va_sleep`` keeps Pebble's random
    validation sleep, ``authz_reuse`` percent of valid authorizations reused (0: every
    order does the DNS work), ``profiles`` name -> validity seconds, ``retry_after``
    (authz, order) seconds for Retry-After headers, ``chain_length`` intermediates.
    """

    def __init__(
        self,
        workdir: Path,
        dns_server: tuple[str, int],
        *,
        nonce_reject: int = 0,
        va_sleep: bool = False,
        authz_reuse: int = 0,
        profiles: Mapping[str, int] | None = None,
        retry_after: tuple[int, int] | None = None,
        chain_length: int = 1,
        key_algorithm: str = "ecdsa",
        start_timeout: float = 20,
    ) -> None:
        self.workdir = Path(workdir)
        self.dns_server = dns_server
        self.nonce_reject = nonce_reject
        self.va_sleep = va_sleep
        self.authz_reuse = authz_reuse
        self.profiles = dict(profiles if profiles is not None else DEFAULT_PROFILES)
        self.retry_after = retry_after
        self.chain_length = chain_length
        self.key_algorithm = key_algorithm
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "pebble.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._acme_port = 0
        self._mgmt_port = 0
        self.https_ca_path = self.workdir / "https-ca.pem"
        self.ca_bundle = self.workdir / "ca-bundle.pem"
        self.roots_pem = ""
        self.intermediates_pem = ""

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self._acme_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self._mgmt_port}"

    def _config(self, cert: Path, key: Path) -> dict[str, object]:
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self._acme_port}",
            "managementListenAddress": f"127.0.0.1:{self._mgmt_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            # Validation ports for http-01/tls-alpn-01 (outgoing only; we use dns-01).
            "httpPort": 5002,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "keyAlgorithm": self.key_algorithm,
            "profiles": {
                name: {"description": f"{name} ({seconds} s)", "validityPeriod": seconds}
                for name, seconds in self.profiles.items()
            },
        }
        if self.retry_after is not None:
            config["retryAfter"] = {"authz": self.retry_after[0], "order": self.retry_after[1]}
        return {"pebble": config}

    def start(self) -> PebbleServer:
        binary = find_pebble()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _ca, cert, key = _make_https_certs(self.workdir)
        self._acme_port, self._mgmt_port = _free_port(), _free_port()
        config_path = self.workdir / "pebble-config.json"
        config_path.write_text(json.dumps(self._config(cert, key), indent=2))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PEBBLE_WFE_NONCEREJECT": str(self.nonce_reject),
            "PEBBLE_AUTHZREUSE": str(self.authz_reuse),
            "PEBBLE_CHAIN_LENGTH": str(self.chain_length),
        }
        if not self.va_sleep:
            env["PEBBLE_VA_NOSLEEP"] = "1"
        host, port = self.dns_server
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(binary), "-config", str(config_path), "-dnsserver", f"{host}:{port}"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        try:
            self._wait_ready()
            self.roots_pem = self._management_get("/roots/0")
            self.intermediates_pem = self._management_get("/intermediates/0")
        except BaseException:
            self.stop()
            raise
        https_ca = self.https_ca_path.read_text()
        self.ca_bundle.write_text(https_ca + self.roots_pem)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise PebbleError(
                    f"pebble exited with {self._process.returncode}: {self.log_tail()}"
                )
            try:
                response = requests.get(
                    self.directory_url, verify=str(self.https_ca_path), timeout=2
                )
                if response.ok:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise PebbleError(f"pebble did not answer within {self.start_timeout} s")
            time.sleep(delay)  # readiness polling, growing pause
            delay = min(delay * 1.5, 0.25)

    def _management_get(self, path: str) -> str:
        response = requests.get(
            self.management_url + path, verify=str(self.https_ca_path), timeout=10
        )
        response.raise_for_status()
        return response.text

    def set_ari_response(self, cert_pem: str, ari_response: str) -> None:
        """Make renewalInfo for this certificate answer ``ari_response`` verbatim
        (Pebble 2.8+ management ``/set-renewal-info/``; the text is not checked)."""
        response = requests.post(
            self.management_url + "/set-renewal-info/",
            json={"Certificate": cert_pem, "ARIResponse": ari_response},
            verify=str(self.https_ca_path),
            timeout=10,
        )
        if not response.ok:
            raise PebbleError(f"set-renewal-info: HTTP {response.status_code}: {response.text}")

    def set_ari_window(
        self,
        cert_pem: str,
        start: datetime.datetime,
        end: datetime.datetime,
        explanation_url: str | None = None,
    ) -> None:
        """Override the suggested renewal window of an issued certificate, e.g. to open it."""

        def fmt(when: datetime.datetime) -> str:
            return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        body: dict[str, object] = {"suggestedWindow": {"start": fmt(start), "end": fmt(end)}}
        if explanation_url is not None:
            body["explanationURL"] = explanation_url
        self.set_ari_response(cert_pem, json.dumps(body))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout=5)

    def __enter__(self) -> PebbleServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
