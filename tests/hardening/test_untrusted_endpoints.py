"""Untrusted answers (issue 5): endpoints that send garbage, close mid-handshake, present
an expired or wrong-name certificate, or never answer. ``renewer check`` (a real process,
``--report-json``) and the decision step report each clearly, within a bounded time, and
never crash; ``check`` exits 1. The probe alone is covered by tests/renewer/test_probe.py,
whose raw server behaviours are reused here.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trustme

from renewer.config import load_settings
from renewer.decide import decide_renewal
from renewer.run import RunOptions, assess_certificate, make_context
from renewer.services import Services
from tests.hardening.conftest import REPO_ROOT, print_figures
from tests.renewer.test_probe import (
    RawServer,
    _close_after_client_hello,
    _garbage,
    _starttls_then,
)

pytestmark = pytest.mark.integration

DOMAIN = "smtp.example.com"
PROBE_TIMEOUT = 10.0  # RunOptions' default, what ``check`` uses
CHECK = (sys.executable, "-m", "renewer", "check")


def _never_answers(_conn: socket.socket, stop: threading.Event) -> None:
    # Accepts and stays silent until the test ends (test_probe's _silent gives up at 10 s,
    # which is exactly check's probe timeout).
    stop.wait(300)


def _smtp_server(
    stack: ExitStack, workdir: Path, name: str, ca: trustme.CA, *names: str, **kwargs: Any
) -> int:
    """A real STARTTLS server (the emulator the Fly machines run) with a chosen cert."""
    leaf = ca.issue_cert(*names, **kwargs)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    ready = workdir / f"{name}.ready"
    with socket.socket() as sock:  # a free port number
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "PRIVATEKEY": base64.b64encode(leaf.private_key_pem.bytes()).decode(),
        "FULLCHAIN": base64.b64encode(chain).decode(),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulators.smtp_server",
            "--listen",
            f"127.0.0.1:{port}/starttls",
            "--ready-file",
            str(ready),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def stop() -> None:
        process.kill()
        process.wait(timeout=10)

    stack.callback(stop)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "SMTP server did not start"
        time.sleep(0.05)
    return port


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A config whose one certificate has a good endpoint and five hostile ones; returns
    (config path, endpoint label -> endpoint text)."""
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    with ExitStack() as stack:
        endpoints = {
            "good": _smtp_server(stack, tmp_path, "good", ca, DOMAIN),
            "expired": _smtp_server(
                stack,
                tmp_path,
                "expired",
                ca,
                DOMAIN,
                not_before=now - datetime.timedelta(days=100),
                not_after=now - datetime.timedelta(days=10),
            ),
            "wrong-name": _smtp_server(stack, tmp_path, "wrong", ca, "other.example.org"),
            "garbage": stack.enter_context(RawServer(_garbage)).port,
            "close-mid-handshake": stack.enter_context(
                RawServer(_starttls_then(_close_after_client_hello))
            ).port,
            "never-answers": stack.enter_context(RawServer(_never_answers)).port,
        }
        texts = {label: f"127.0.0.1:{port}" for label, port in endpoints.items()}  # STARTTLS
        ca.cert_pem.write_to_path(str(tmp_path / "test-ca.pem"))
        config = {
            "acme": {"directory": "https://127.0.0.1:9/dir", "ca_bundle": "test-ca.pem"},
            "dns": {"api_base_url": "http://127.0.0.1:9/client/v4"},
            "renewal": {"ari": False},
            "certificates": [
                {
                    "name": "hostile",
                    "domains": [DOMAIN],
                    "endpoints": list(texts.values()),
                    "targets": [{"type": "dotenv", "path": "smtp.env"}],
                }
            ],
        }
        path = tmp_path / "renewer.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        yield path, texts


EXPECTED = {
    "expired": "expire",
    "wrong-name": f"does not cover {DOMAIN}",
    "garbage": "not an SMTP reply",
    "close-mid-handshake": "connection closed during the TLS handshake",
    "never-answers": "no answer within",
}


def test_check_reports_every_hostile_endpoint_and_exits_1(
    hostile: tuple[Path, dict[str, str]],
) -> None:
    config, endpoints = hostile
    report_path = config.parent / "check.json"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "CLOUDFLARE_API_TOKEN": "x" * 40,
    }
    started = time.monotonic()
    done = subprocess.run(
        [*CHECK, "--config", str(config), "--report-json", str(report_path)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    report = json.loads(report_path.read_text())
    assert report["status"] == "problems"
    by_endpoint = {e["endpoint"]: e for e in report["certificates"][0]["endpoints"]}
    assert by_endpoint[endpoints["good"]]["status"] == "ok"  # the negative control
    for label, needle in EXPECTED.items():
        entry = by_endpoint[endpoints[label]]
        assert entry["status"] == "problems", (label, entry)
        problems = " ".join(entry.get("problems") or [])
        assert needle in problems, (label, problems)
        assert endpoints[label] in output  # named on stdout too
    # Probes run in parallel, each bounded by the probe timeout (a silent server costs
    # at most a couple of timeouts), never an unbounded hang.
    assert took < 3 * PROBE_TIMEOUT + 5, f"check took {took:.1f}s"
    print_figures("renewer check on 5 hostile endpoints + 1 good", seconds=took, exit=1)


def test_decision_treats_hostile_endpoints_as_problems_not_crashes(
    hostile: tuple[Path, dict[str, str]],
) -> None:
    config, endpoints = hostile
    settings = load_settings(str(config), {"CLOUDFLARE_API_TOKEN": "x" * 40}, config.parent)
    with Services(settings, config.parent) as services:
        ctx = make_context(settings, RunOptions(probe_timeout=2.0), services)
        cert = settings.config.certificates[0]
        started = time.monotonic()
        states = assess_certificate(ctx, cert)
        decision = decide_renewal(states, force=False)
        took = time.monotonic() - started
    by_endpoint = {str(s.endpoint): s for s in states}
    assert by_endpoint[endpoints["good"]].good
    for label, needle in EXPECTED.items():
        state = by_endpoint[endpoints[label]]
        assert not state.good, label
        assert needle in " ".join(state.problems), (label, state.problems)
    # Expired and wrong-name certificates make renewal due; so the run would renew.
    assert decision.due
    assert took < 3 * 2.0 + 3, f"decision took {took:.1f}s"
    print_figures("decision on 5 hostile endpoints + 1 good", seconds=took, due=decision.due)
