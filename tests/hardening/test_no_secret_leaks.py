"""Secrets (issue 5): nothing the job prints, logs, reports or emails carries a token, the
TSIG secret, the ACME account key or private key material (also as base64).

Every test of this suite is scanned by the ``runs`` fixture (conftest.py, leakscan.py);
this file proves the scanner catches what it must (negative control), drives the runs
that print the most (failures with API errors), and checks the HTTP clients' error
messages against each emulator's 401/403/500 and against a server that echoes the
request (headers and body) back in its error body.

Not covered: the Pulumi mock outputs (tests/infra) are not scanned here; their secret
handling is tested by tests/infra itself.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from emulators.world import SUBMISSION_APP, ZONE_ID
from renewer.dns_cloudflare import CloudflareDns, cloudflare_session
from renewer.errors import RenewerError
from renewer.fly import FlyClient
from renewer.mailpace import MailPaceClient
from renewer.sensitive import Secret
from tests.hardening.conftest import Runs, print_figures
from tests.hardening.leakscan import Needles, needles_for_world, scan

pytestmark = pytest.mark.integration


def _key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_the_scanner_catches_every_form_of_a_secret() -> None:
    pem = _key_pem()
    b64 = base64.b64encode(pem.encode()).decode()
    token = "cf-" + "A1b2C3d4" * 5
    needles = Needles()
    needles.add("token", token)
    needles.add_key_material("key", b64)
    body_line = pem.splitlines()[1]
    planted = {
        "pem": f"oops {pem}",
        "pem marker alone": "\x2d----BEGIN EC PRIVATE KEY-----",
        "base64 of pem": f"PRIVATEKEY={b64}",
        "base64 of an unknown key": base64.b64encode(_key_pem().encode()).decode(),
        "truncated excerpt": f"HTTP 400: {b64[:40]}",
        "pem body line": f"line {body_line}",
        "token": f"Authorization: Bearer {token}",
        "half a token": f"token {token[:30]}",
    }
    findings = scan(list(planted.items()), [needles])
    assert {f.where for f in findings} == set(planted), findings
    assert all(token not in str(f) and b64 not in str(f) for f in findings)  # masked
    clean = [("clean", "Renewed: relay, serial 0a1b, sha256 " + "ab" * 32)]
    assert scan(clean, [needles]) == []


def test_runs_that_fail_loudly_print_no_secrets(runs: Runs) -> None:
    """A success, then failures at every API with their error texts, all scanned."""
    world = runs.world(with_dotenv=True)
    assert world.fly is not None and world.mailpace is not None
    first = runs.run(world)
    assert first.code == 0, first.output[-4000:]
    needles = needles_for_world(world)
    labels = {label.split(" (")[0] for label, _ in needles.items}
    # The scan had real material to look for: tokens, account key, deployed keys.
    assert {
        "Cloudflare token",
        "Fly token",
        "MailPace token",
        "ACME account key",
        "dotenv PRIVATEKEY",
        f"Fly {SUBMISSION_APP} PRIVATEKEY",
    } <= labels, labels
    world.cloudflare.inject_fault("POST", "/zones/*/dns_records", status=403, times=1)
    world.fly.inject_fault("POST", r"/secrets$", 500, times=10)
    world.mailpace.inject_fault(500, times=10)
    failed = runs.run(world, "--force")
    assert failed.code == 1
    texts = [("stdout", failed.stdout), ("stderr", failed.stderr)]
    findings = scan(texts, [needles, needles_for_world(world)])
    assert findings == [], findings
    print_figures("leak scan of a loud failure", bytes_scanned=len(failed.output))


def test_tsig_secret_never_printed(runs: Runs) -> None:
    """The RFC 2136 provider against a server that does not answer: the run fails and
    says so, without the TSIG secret."""
    world = runs.world(with_fly=False, with_notify=False)
    config = world.config()
    config["dns"] = {
        "provider": "rfc2136",
        "server": "127.0.0.1:9",
        "tsig_name": "renewer-key",
        "propagation_timeout": 2,
    }
    (world.workdir / "renewer.json").write_text(json.dumps(config), encoding="utf-8")
    tsig = base64.b64encode(os.urandom(32)).decode()
    needles = Needles()
    needles.add("TSIG secret", tsig)
    runs.extra_needles.append(needles)
    result = runs.run(world, env=runs.env(world, RFC2136_TSIG_SECRET=tsig))
    assert result.code == 1, result.output[-3000:]
    assert "relay" in result.output
    assert scan([("run", result.output)], [needles]) == []


# -- HTTP client errors ----------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request with ``status`` and the request itself (headers + body) in
    the body, as a misconfigured proxy or debug endpoint might."""

    status = 400
    as_json = False

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode(errors="replace") if length else ""
        echoed = "".join(f"{k}: {v}\n" for k, v in self.headers.items()) + body
        if self.as_json:
            payload = json.dumps(
                {"error": echoed, "message": echoed, "errors": [{"code": 1, "message": echoed}]}
            ).encode()
        else:
            payload = echoed.encode()
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _echo


@pytest.fixture(params=[False, True], ids=["text", "json"])
def echo_url(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Echo", (_EchoHandler,), {"as_json": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _error_texts(call: Callable[[], object]) -> list[tuple[str, str]]:
    """The error's str and repr, and those of every exception in its chain."""
    try:
        call()
    except RenewerError as exc:
        texts = []
        seen: BaseException | None = exc
        while seen is not None:
            texts += [("str", str(seen)), ("repr", repr(seen))]
            seen = seen.__cause__ or seen.__context__
        return texts
    raise AssertionError("the call did not fail")


def _client_calls(base: str, token: str, key_b64: str) -> dict[str, Callable[[], object]]:
    fly = FlyClient(base, Secret(token), max_attempts=1)
    mailpace = MailPaceClient(base + "/api/v1", Secret(token), max_attempts=1)
    session = cloudflare_session(base + "/client/v4", Secret(token), max_attempts=1)
    cloudflare = CloudflareDns(base, Secret(token), {"example.test": ZONE_ID}, session=session)
    return {
        "fly secrets": lambda: fly.set_secrets(SUBMISSION_APP, {"PRIVATEKEY": Secret(key_b64)}),
        "fly lease": lambda: fly.acquire_lease(SUBMISSION_APP, "0123456789abcd", 60),
        "mailpace send": lambda: mailpace.send(
            "a@example.test", ["b@example.test"], "s", key_b64, [], "k"
        ),
        "cloudflare create": lambda: cloudflare.create_txt(
            "_acme-challenge.x.example.test", key_b64
        ),
    }


def test_api_errors_never_echo_request_headers_or_bodies(echo_url: str) -> None:
    token = "FlyV1 fm2_" + "Zx9" * 20
    key_b64 = base64.b64encode(_key_pem().encode()).decode()
    needles = Needles()
    needles.add("token", token)
    needles.add("bare token", token.removeprefix("FlyV1 "))
    needles.add_key_material("private key", key_b64)
    texts = []
    for name, call in _client_calls(echo_url, token, key_b64).items():
        texts += [(f"{name} {kind}", text) for kind, text in _error_texts(call)]
    findings = scan(texts, [needles])
    assert findings == [], "\n".join(str(f) for f in findings)


@pytest.mark.parametrize("status", [401, 403, 500])
def test_emulator_errors_carry_no_tokens(runs: Runs, status: int) -> None:
    world = runs.world(with_dotenv=False)
    fly_api, sink, cloudflare = world.fly, world.mailpace, world.cloudflare
    assert fly_api is not None and sink is not None
    key_b64 = base64.b64encode(_key_pem().encode()).decode()
    wrong = "FlyV1 fm2_" + "Wr0ng" * 8
    zones = {"example.test": ZONE_ID}
    fly_token, mail_token, cf_token = world.fly_token, world.mailpace_token, world.cloudflare_token
    if status == 401:  # tokens the services do not know
        fly_token, mail_token, cf_token = wrong, "", "W" * 40
    fly = FlyClient(fly_api.base_url, Secret(fly_token), max_attempts=1)
    mailpace = MailPaceClient(sink.base_url, Secret(mail_token), max_attempts=1)
    session = cloudflare_session(cloudflare.base_url, Secret(cf_token), max_attempts=1)
    dns = CloudflareDns(cloudflare.base_url, Secret(cf_token), zones, session=session)
    sender = "certs@example.test"
    app = SUBMISSION_APP
    if status == 403:  # a token without the right scope
        sender = "certs@other.example"  # not the token's domain
        app = "someone-elses-app"
        cloudflare.inject_fault("POST", "/zones/*/dns_records", status=403, times=1)
    if status == 500:
        fly_api.inject_fault("*", ".", 500, times=5)
        sink.inject_fault(500, times=5)
        cloudflare.inject_fault("*", "*", status=500, times=5)
    calls: dict[str, Callable[[], object]] = {
        "fly": lambda: fly.set_secrets(app, {"PRIVATEKEY": Secret(key_b64)}),
        "mailpace": lambda: mailpace.send(sender, ["ops@example.test"], "s", key_b64, [], "k"),
        "cloudflare": lambda: dns.create_txt("_acme-challenge.x.example.test", key_b64),
    }
    needles = needles_for_world(world)
    needles.add("wrong token", wrong)
    needles.add_key_material("private key sent", key_b64)
    texts = []
    for name, call in calls.items():
        errors = _error_texts(call)
        # Cloudflare answers an unknown token with 403 (code 9109), not 401.
        shown = {401: ("401", "403")}.get(status, (str(status),))
        assert any(code in text for code in shown for _, text in errors), (name, errors)
        texts += [(f"{name} {kind}", text) for kind, text in errors]
        runs.keep(f"{name} error", errors[0][1])
    findings = scan(texts, [needles])
    assert findings == [], "\n".join(str(f) for f in findings)
    print_figures(f"API errors at HTTP {status}", clients=len(calls), leaks=len(findings))
