"""A whole run with the RFC 2136 provider: Pebble asks a real BIND 9 for the TXT records
the job writes there with TSIG-signed updates. Plus the heartbeat ping."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest

from emulators.bind import BindServer, generate_tsig_secret
from emulators.pebble import PebbleServer
from renewer.cli import run_renewal

pytestmark = pytest.mark.integration

ZONE = "example.org"
KEY = "renewer-key"


@pytest.fixture
def bind_and_pebble(tmp_path: Path) -> Iterator[tuple[BindServer, PebbleServer, str]]:
    secret = generate_tsig_secret()
    with (
        BindServer(tmp_path / "bind", [ZONE], tsig_name=KEY, tsig_secret_b64=secret) as bind,
        PebbleServer(tmp_path / "pebble", bind.address) as pebble,
    ):
        yield bind, pebble, secret


class _Heartbeat(BaseHTTPRequestHandler):
    pings: list[str] = []  # noqa: RUF012 - one list per test via a subclass

    def do_GET(self) -> None:
        self.pings.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def heartbeat() -> Iterator[tuple[str, list[str]]]:
    class Handler(_Heartbeat):
        pings: list[str] = []  # noqa: RUF012

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ping/renewer", Handler.pings
    finally:
        server.shutdown()
        server.server_close()


def _config(bind: BindServer, pebble: PebbleServer, workdir: Path, heartbeat_url: str) -> Path:
    (workdir / "ca.pem").write_bytes(pebble.ca_bundle.read_bytes())
    host, port = bind.address
    config: dict[str, Any] = {
        "acme": {
            "directory": pebble.directory_url,
            "ca_bundle": "ca.pem",
            "account_key_file": "account.pem",
        },
        "dns": {
            "provider": "rfc2136",
            "server": f"{host}:{port}",
            "tsig_name": KEY,
            "tsig_algorithm": "hmac-sha256",
            "nameservers": [f"{host}:{port}"],
            "propagation_timeout": 20,
        },
        "certificates": [
            {
                "name": "mail",
                "domains": [f"mail.{ZONE}", f"mx.{ZONE}"],
                "targets": [{"type": "dotenv", "path": "mail.env"}],
            }
        ],
        "heartbeat_url": heartbeat_url,
    }
    path = workdir / "renewer.json"
    path.write_text(json.dumps(config))
    return path


def _txt_names(bind: BindServer) -> list[str]:
    """The _acme-challenge TXT records BIND still serves."""
    left = []
    for name in (f"_acme-challenge.mail.{ZONE}", f"_acme-challenge.mx.{ZONE}"):
        query = dns.message.make_query(name, "TXT")
        response = dns.query.tcp(query, bind.address[0], port=bind.address[1], timeout=5)
        if response.rcode() == dns.rcode.NOERROR and response.answer:
            left.append(name)
    return left


def test_rfc2136_run_issues_through_bind_and_cleans_up(
    bind_and_pebble: tuple[BindServer, PebbleServer, str],
    heartbeat: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    bind, pebble, secret = bind_and_pebble
    url, pings = heartbeat
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = _config(bind, pebble, workdir, url)
    env = {"RFC2136_TSIG_SECRET": secret}

    code = run_renewal(
        str(config), env, force=False, dry_run=False, report_json="r1.json", cwd=workdir
    )
    report = json.loads((workdir / "r1.json").read_text()) if (workdir / "r1.json").exists() else {}
    assert code == 0, report
    cert = report["certificates"][0]
    assert cert["action"] == "renewed"
    assert cert["timings"]["issue.propagation"] < 1.0
    assert _txt_names(bind) == [], "TXT records must be removed after the run"
    assert pings == ["/ping/renewer"]

    code = run_renewal(
        str(config), env, force=False, dry_run=False, report_json="r2.json", cwd=workdir
    )
    assert code == 0
    second = json.loads((workdir / "r2.json").read_text())
    assert second["status"] == "nothing_due"
    assert len(pings) == 2


def test_wrong_tsig_secret_fails_the_run_and_skips_the_heartbeat(
    bind_and_pebble: tuple[BindServer, PebbleServer, str],
    heartbeat: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    bind, pebble, _secret = bind_and_pebble
    url, pings = heartbeat
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = _config(bind, pebble, workdir, url)

    code = run_renewal(
        str(config),
        {"RFC2136_TSIG_SECRET": generate_tsig_secret()},
        force=False,
        dry_run=False,
        report_json="r.json",
        cwd=workdir,
    )

    report = json.loads((workdir / "r.json").read_text())
    assert code == 1
    assert report["certificates"][0]["error"]["step"] == "issue"
    assert "TSIG" in report["certificates"][0]["error"]["message"]
    assert not (workdir / "mail.env").exists()
    assert pings == [], "a failed run must not ping the heartbeat"
