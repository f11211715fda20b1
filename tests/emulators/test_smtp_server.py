"""emulators.smtp_server as the Fly emulator and the demo run it: a separate process
reading PRIVATEKEY/FULLCHAIN (base64 PEM) from its environment or a dotenv file."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from emulators.smtp_server import PLACEHOLDER_NAME, SmtpServer, read_env_file
from renewer.certs import dns_names, fingerprint_sha256
from renewer.errors import CertificateInvalidError
from renewer.probe import Endpoint, probe_endpoint

REPO = Path(__file__).resolve().parents[2]
SNI = "smtp.example.com"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _values(ca: trustme.CA) -> tuple[str, str, str]:
    """(PRIVATEKEY, FULLCHAIN, leaf fingerprint) as `base64 -w 0` of the PEM files."""
    cert = ca.issue_cert(SNI)
    pem = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    leaf = x509.load_pem_x509_certificate(pem)
    return _b64(cert.private_key_pem.bytes()), _b64(pem), fingerprint_sha256(leaf)


def _wait_for(predicate: Any, what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state


@contextmanager
def _process(
    tmp_path: Path, *extra: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    ready = tmp_path / "ready.json"
    argv = [
        sys.executable,
        "-m",
        "emulators.smtp_server",
        "--listen",
        "127.0.0.1:0/starttls",
        "--listen",
        "127.0.0.1:0/tls",
        "--ready-file",
        str(ready),
        *extra,
    ]
    child_env = {k: v for k, v in os.environ.items() if k not in ("PRIVATEKEY", "FULLCHAIN")}
    child_env.update(env or {})
    proc = subprocess.Popen(
        argv, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def _served(port: int, mode: str) -> str:
    endpoint = Endpoint("127.0.0.1", port, "tls" if mode == "tls" else "starttls")
    return fingerprint_sha256(probe_endpoint(endpoint, SNI, timeout=5).leaf)


@pytest.mark.integration
def test_process_serves_certificate_from_environment(tmp_path: Path) -> None:
    key, chain, fingerprint = _values(trustme.CA())
    with _process(tmp_path, env={"PRIVATEKEY": key, "FULLCHAIN": chain}) as (proc, ready):
        state = _wait_for(lambda: _ready(ready), "the ready file")
        assert state["fingerprint"] == fingerprint and state["placeholder"] is False
        starttls_port, tls_port = state["ports"]
        assert _served(starttls_port, "starttls") == fingerprint
        assert _served(tls_port, "tls") == fingerprint
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0  # a clean stop
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read().startswith("READY 127.0.0.1:")
        log = proc.stderr.read()
    assert "stopping on SIGTERM" in log
    assert key not in log  # the key never reaches the log


@pytest.mark.integration
def test_env_file_and_sighup_reload(tmp_path: Path) -> None:
    ca = trustme.CA()
    key1, chain1, first = _values(ca)
    key2, chain2, second = _values(ca)
    env_file = tmp_path / "smtp.env"
    env_file.write_text(
        f"# written by the renewer\nOTHER=1\nPRIVATEKEY={key1}\nFULLCHAIN={chain1}\n"
    )
    # The environment holds a different certificate: --env-file wins.
    decoy_key, decoy_chain, decoy = _values(ca)
    env = {"PRIVATEKEY": decoy_key, "FULLCHAIN": decoy_chain}
    with _process(tmp_path, "--env-file", str(env_file), env=env) as (proc, ready):
        state = _wait_for(lambda: _ready(ready), "the ready file")
        starttls_port, tls_port = state["ports"]
        assert _served(starttls_port, "starttls") == first != decoy
        env_file.write_text(f"PRIVATEKEY={key2}\nFULLCHAIN={chain2}\n")
        # Negative control: without SIGHUP the running server keeps the old certificate.
        assert _served(starttls_port, "starttls") == first
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: (_ready(ready) or {}).get("fingerprint") == second, "the reload")
        assert _served(starttls_port, "starttls") == second
        assert _served(tls_port, "tls") == second
        # A broken file on reload: the server keeps serving and says why.
        env_file.write_text("PRIVATEKEY=%%%\nFULLCHAIN=%%%\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert proc.poll() is None
        assert _served(tls_port, "tls") == second
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert "reload failed, still serving the old certificate" in log
    assert key1 not in log and key2 not in log


@pytest.mark.integration
def test_placeholder_when_no_certificate_is_set(tmp_path: Path) -> None:
    with _process(tmp_path, "--env-file", str(tmp_path / "absent.env")) as (proc, ready):
        state = _wait_for(lambda: _ready(ready), "the ready file")
        assert state["placeholder"] is True
        endpoint = Endpoint("127.0.0.1", state["ports"][0], "starttls")
        leaf = probe_endpoint(endpoint, SNI, timeout=5).leaf
        assert dns_names(leaf) == (PLACEHOLDER_NAME,)
        assert leaf.issuer == leaf.subject  # self-signed
        assert fingerprint_sha256(leaf) == state["fingerprint"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert proc.stderr is not None
        assert "no certificate configured" in proc.stderr.read()


@pytest.mark.integration
def test_unusable_values_stop_the_start(tmp_path: Path) -> None:
    key, _, _ = _values(trustme.CA())
    _, other_chain, _ = _values(trustme.CA())
    env = {"PRIVATEKEY": key, "FULLCHAIN": other_chain}  # a key for another certificate
    with _process(tmp_path, env=env) as (proc, ready):
        assert proc.wait(timeout=10) == 2
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert not ready.exists()
    assert "private key does not match the certificate" in log
    assert key not in log


@pytest.mark.integration
def test_in_process_server_accepts_mail_and_reloads() -> None:
    ca = trustme.CA()
    key1, chain1, first = _values(ca)
    key2, chain2, second = _values(ca)
    with SmtpServer([(0, "starttls")], key1, chain1) as server:
        assert server.fingerprint == first
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        client_context.check_hostname = False  # we dial an address; the chain is still verified
        with smtplib.SMTP("127.0.0.1", server.ports[0], timeout=5) as client:
            client.starttls(context=client_context)
            refused = client.sendmail("a@example.com", ["b@example.com"], "Subject: hi\r\n\r\nx")
        assert refused == {}
        assert server.reload(key2, chain2) == second
        assert _served(server.ports[0], "starttls") == second
        with pytest.raises(CertificateInvalidError):
            server.reload("%%%", chain2)
        assert _served(server.ports[0], "starttls") == second


def test_read_env_file(tmp_path: Path) -> None:
    path = tmp_path / "app.env"
    path.write_text('# c\n\nexport A=1\nB="two"\nC=x=y\nnot a line\n')
    assert read_env_file(path) == {"A": "1", "B": "two", "C": "x=y"}
    assert read_env_file(tmp_path / "missing") == {}
