"""Whole runs of the job against the loopback world: Pebble, DNS, Cloudflare, Fly (machines
are real SMTP servers), a dotenv-fed relay and the MailPace sink. The job runs through
the same code as in production (``run_renewal``), with only base URLs pointing here.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from emulators.pebble import LETSENCRYPT_PROFILES
from emulators.world import INBOUND_APP, SUBMISSION_APP, LocalWorld, WorldOptions
from renewer.certs import fingerprint_sha256
from renewer.cli import run_renewal
from renewer.keys import tlsa_3_1_1
from renewer.probe import Endpoint, probe_endpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[LocalWorld]:
    with LocalWorld(tmp_path / "world") as w:
        yield w


def renew(
    world: LocalWorld,
    *,
    force: bool = False,
    dry_run: bool = False,
    config: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    path = world.workdir / "renewer.json"
    path.write_text(json.dumps(config or world.config()))
    report_path = world.workdir / "report.json"
    code = run_renewal(
        str(path),
        world.env(),
        force=force,
        dry_run=dry_run,
        report_json=str(report_path),
        cwd=world.workdir,
    )
    return code, json.loads(report_path.read_text())


def served_fingerprints(world: LocalWorld, cert: dict[str, Any]) -> set[str]:
    """What each endpoint serves, probed a few times so every machine behind a front shows."""
    seen = set()
    for text in cert["endpoints"]:
        endpoint = Endpoint.parse(text)
        for _ in range(4):
            seen.add(
                fingerprint_sha256(probe_endpoint(endpoint, cert["domains"][0], timeout=5).leaf)
            )
    return seen


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["certificates"]}


def test_first_run_renews_everything_and_second_run_finds_nothing_due(world: LocalWorld) -> None:
    code, report = renew(world)

    assert code == 0, report["error"]
    assert report["status"] == "renewed"
    certs = by_name(report)
    assert set(certs) == {"submission", "inbound", "relay"}
    for name, cert in certs.items():
        assert cert["action"] == "renewed", (name, cert["error"])
        assert all(t["status"] == "deployed" for t in cert["targets"]), cert["targets"]
        assert cert["endpoints"] and all(e["matches_new"] for e in cert["endpoints"]), cert
        assert len(cert["fingerprint_sha256"]) == 64
    # Every machine behind every front port now serves the new certificate.
    for cert_config in world.config()["certificates"]:
        assert served_fingerprints(world, cert_config) == {
            certs[cert_config["name"]]["fingerprint_sha256"]
        }
    # One secrets call per app, and machines of one app never updated at the same time.
    assert world.fly is not None
    for app in (SUBMISSION_APP, INBOUND_APP):
        assert world.fly.secrets_calls(app) == 1
        windows = sorted(world.fly.update_timeline(app), key=lambda w: w.started_at)
        assert len(windows) == len(world.fly.machine_ids(app))
        for earlier, later in itertools.pairwise(windows):
            assert earlier.end <= later.started_at, f"{app}: overlapping machine updates"
    # The dotenv file holds exactly base64 -w0 of the PEMs, mode 0600.
    env_file = world.workdir / "relay.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    leaf = x509.load_pem_x509_certificate(base64.b64decode(values["FULLCHAIN"]))
    assert fingerprint_sha256(leaf) == certs["relay"]["fingerprint_sha256"]
    assert base64.b64decode(values["PRIVATEKEY"]).startswith(b"-----BEGIN")
    # The email says the outcome first; no TXT record is left behind.
    assert world.mailpace is not None
    assert (world.mailpace.messages[-1].subject or "").startswith("Renewed:")
    assert not [n for n in world.store.names() if n.startswith("_acme-challenge")]

    orders_before = _orders(world)
    code, second = renew(world)

    assert code == 0
    assert second["status"] == "nothing_due"
    assert all(c["action"] == "skipped" for c in second["certificates"])
    assert _orders(world) == orders_before, "a nothing-due run must not order anything"
    assert world.fly.secrets_calls(SUBMISSION_APP) == 1
    assert (world.mailpace.messages[-1].subject or "").startswith("Nothing due:")


def test_force_renews_again_with_new_serials(world: LocalWorld) -> None:
    renew(world)
    _, first = renew(world)
    assert first["status"] == "nothing_due"
    before = {c["name"]: c["endpoints"][0]["serial"] for c in first["certificates"]}

    code, forced = renew(world, force=True)

    assert code == 0
    assert forced["status"] == "renewed"
    for cert in forced["certificates"]:
        assert cert["serial"] != before[cert["name"]]
        assert all(e["matches_new"] for e in cert["endpoints"])


def test_dry_run_issues_and_validates_but_deploys_nothing(world: LocalWorld) -> None:
    env_file = world.workdir / "relay.env"
    before = env_file.read_bytes()

    code, report = renew(world, dry_run=True)

    assert code == 0
    assert report["dry_run"] is True
    for cert in report["certificates"]:
        assert cert["action"] == "renewed"
        assert cert["serial"]
        assert all(t["status"] == "skipped" for t in cert["targets"])
    assert world.fly is not None
    assert world.fly.secrets_calls(SUBMISSION_APP) == 0
    assert env_file.read_bytes() == before
    # Negative control: the live endpoints still serve the placeholders.
    _, after = renew(world, dry_run=True)
    assert all(c["action"] == "renewed" for c in after["certificates"])


def test_nothing_is_deployed_when_validation_fails(world: LocalWorld) -> None:
    # Trust only the CA of Pebble's HTTPS listener: ACME works, but the issued chain
    # leads to Pebble's root, which is now untrusted, so validation must refuse it.
    config = world.config()
    https_only = world.workdir / "https-only.pem"
    https_only.write_bytes(world.pebble.https_ca_path.read_bytes())
    config["acme"]["ca_bundle"] = "https-only.pem"
    env_file = world.workdir / "relay.env"
    before = env_file.read_bytes()

    code, report = renew(world, config=config)

    assert code == 1
    assert report["status"] == "failed"
    for cert in report["certificates"]:
        assert cert["action"] == "failed"
        assert cert["error"]["step"] == "validate", cert["error"]
        assert cert["targets"] == []
    assert world.fly is not None
    assert world.fly.secrets_calls(SUBMISSION_APP) == 0
    assert world.fly.secrets_calls(INBOUND_APP) == 0
    assert env_file.read_bytes() == before
    assert world.mailpace is not None
    assert (world.mailpace.messages[-1].subject or "").startswith("FAILED:")


def test_open_ari_window_renews_with_replaces(world: LocalWorld) -> None:
    code, first = renew(world)
    assert code == 0
    relay_endpoint = Endpoint.parse(by_name(first)["relay"]["endpoints"][0]["endpoint"])
    served = probe_endpoint(relay_endpoint, "relay.example.test", timeout=5)
    pem = served.leaf.public_bytes(Encoding.PEM)
    now = datetime.now(UTC)

    # Negative control: a window in the future changes nothing.
    world.pebble.set_ari_window(pem.decode(), now + timedelta(days=5), now + timedelta(days=6))
    _, unchanged = renew(world)
    assert by_name(unchanged)["relay"]["action"] == "skipped"

    world.pebble.set_ari_window(pem.decode(), now - timedelta(hours=1), now + timedelta(days=1))
    code, report = renew(world)

    relay = by_name(report)["relay"]
    assert code == 0
    assert relay["action"] == "renewed"
    assert "renewal window opened" in relay["reason"]
    assert relay["replaces"], "the order must name its predecessor (ARI replaces)"
    assert by_name(report)["submission"]["action"] == "skipped"


def test_profile_is_requested_and_honoured(tmp_path: Path) -> None:
    options = WorldOptions(with_fly=False, with_notify=False, profiles=LETSENCRYPT_PROFILES)
    with LocalWorld(tmp_path / "world", options) as world:
        config = world.config()
        config["acme"]["profile"] = "tlsserver"
        code, report = renew(world, config=config)

        assert code == 0
        relay = by_name(report)["relay"]
        not_after = datetime.fromisoformat(relay["not_after"].replace("Z", "+00:00"))
        lifetime = not_after - datetime.now(UTC)
        assert timedelta(days=44) < lifetime <= timedelta(days=45), lifetime

        config["acme"]["profile"] = "no-such-profile"
        code, report = renew(world, config=config, force=True)
        assert code == 1
        assert "no-such-profile" in report["error"]["message"]


def test_failing_machine_halts_the_rollout_and_a_rerun_completes(world: LocalWorld) -> None:
    assert world.fly is not None
    first_id, _second_id = world.fly.machine_ids(SUBMISSION_APP)
    world.fly.machine_fails_checks(SUBMISSION_APP, first_id)
    config = world.config()
    for cert in config["certificates"]:
        for target in cert["targets"]:
            if target["type"] == "fly":
                target["wait_timeout"] = 3

    code, report = renew(world, config=config)

    submission = by_name(report)["submission"]
    assert code == 1
    assert submission["action"] == "failed"
    assert submission["error"]["step"] == "deploy"
    assert first_id in submission["error"]["message"]
    # The second machine was left untouched; the other certificates went through.
    assert [w.machine_id for w in world.fly.update_timeline(SUBMISSION_APP)] == [first_id]
    assert by_name(report)["inbound"]["action"] == "renewed"
    assert by_name(report)["relay"]["action"] == "renewed"
    assert world.mailpace is not None
    failed_mail = world.mailpace.messages[-1]
    assert (failed_mail.subject or "").startswith("FAILED:")
    assert first_id in (failed_mail.textbody or "")

    world.fly.machine_fails_checks(SUBMISSION_APP, first_id, False)
    code, rerun = renew(world, config=config)

    assert code == 0, rerun["error"]
    assert by_name(rerun)["submission"]["action"] == "renewed"
    # Decided from the machines' release markers, not from the luck of the proxy.
    assert "the last rollout did not finish" in by_name(rerun)["submission"]["reason"]
    assert by_name(rerun)["inbound"]["action"] == "skipped"
    assert served_fingerprints(world, config["certificates"][0]) == {
        by_name(rerun)["submission"]["fingerprint_sha256"]
    }


def test_cli_run_and_check_exit_codes(world: LocalWorld) -> None:
    path = world.write_config()
    env = {**os.environ, **world.env(), "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "renewer", *args, "--config", str(path)],
            env=env,
            cwd=world.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    check = cli("check", "--report-json", "check.json")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "placeholder" in check.stdout
    statuses = [
        e["status"]
        for c in json.loads((world.workdir / "check.json").read_text())["certificates"]
        for e in c["endpoints"]
    ]
    assert statuses and set(statuses) == {"problems"}

    run = cli("run", "--report-json", "run.json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((world.workdir / "run.json").read_text())["status"] == "renewed"

    check = cli("check", "--report-json", "check.json")
    assert check.returncode == 0, check.stdout
    statuses = [
        e["status"]
        for c in json.loads((world.workdir / "check.json").read_text())["certificates"]
        for e in c["endpoints"]
    ]
    assert set(statuses) == {"ok"}


def _orders(world: LocalWorld) -> int:
    """Orders Pebble created, counted from its log (one line per new order)."""
    return world.pebble.log_path.read_text(errors="replace").count("Added order")


def test_without_endpoints_the_dotenv_file_shows_what_is_deployed(tmp_path: Path) -> None:
    options = WorldOptions(with_fly=False, with_notify=False)
    with LocalWorld(tmp_path / "world", options) as world:
        config = world.config()
        config["certificates"][0]["endpoints"] = []

        code, first = renew(world, config=config)
        assert code == 0
        assert by_name(first)["relay"]["action"] == "renewed"
        assert "holds no FULLCHAIN" in by_name(first)["relay"]["reason"]

        code, second = renew(world, config=config)
        assert code == 0
        relay = by_name(second)["relay"]
        assert relay["action"] == "skipped", relay["reason"]
        assert relay["endpoints"][0]["endpoint"] == "dotenv relay.env"
        assert relay["endpoints"][0]["serial"] == by_name(first)["relay"]["serial"]

        # Negative control: a file holding garbage is due again.
        env_file = world.workdir / "relay.env"
        env_file.write_text("FULLCHAIN=bm90IGEgY2VydGlmaWNhdGU=\n")
        code, third = renew(world, config=config)
        assert by_name(third)["relay"]["action"] == "renewed"
        assert "not a PEM chain" in by_name(third)["relay"]["reason"]


def test_key_env_keeps_the_key_across_renewals_for_dane(tmp_path: Path) -> None:
    options = WorldOptions(with_fly=False, with_notify=False)
    with LocalWorld(tmp_path / "world", options) as world:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
        config = world.config()
        config["certificates"][0]["key_env"] = "RELAY_TLS_KEY"
        env = {**world.env(), "RELAY_TLS_KEY": pem}

        tlsa = []
        for force in (False, True):
            path = world.workdir / "renewer.json"
            path.write_text(json.dumps(config))
            code = run_renewal(
                str(path), env, force=force, dry_run=False, report_json="r.json", cwd=world.workdir
            )
            assert code == 0
            relay = by_name(json.loads((world.workdir / "r.json").read_text()))["relay"]
            assert relay["action"] == "renewed"
            tlsa.append(relay["tlsa_3_1_1"])
        assert tlsa[0] == tlsa[1] == tlsa_3_1_1(key.public_key())

        # Negative control: without key_env, a forced renewal brings a new key.
        del config["certificates"][0]["key_env"]
        _, report = renew(world, config=config, force=True)
        assert by_name(report)["relay"]["tlsa_3_1_1"] != tlsa[0]


def test_check_preflight_finds_tokens_that_would_fail_the_next_renewal(world: LocalWorld) -> None:
    path = world.write_config()

    def check(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "renewer",
                "check",
                "--config",
                str(path),
                "--report-json",
                "c.json",
            ],
            env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            cwd=world.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.returncode, json.loads((world.workdir / "c.json").read_text())

    renew(world)
    code, good = check(world.env())
    assert code == 0
    assert good["preflight"] and {p["status"] for p in good["preflight"]} == {"ok"}
    checks = {p["check"] for p in good["preflight"]}
    assert "fly app demo-submission" in checks
    assert "dns cloudflare _acme-challenge.mx.example.test" in checks

    wrong = {**world.env(), "CLOUDFLARE_API_TOKEN": "x" * 40, "FLY_API_TOKEN": "FlyV1 fm2_nope"}
    code, bad = check(wrong)
    assert code == 1
    problems = {p["check"]: p["detail"] for p in bad["preflight"] if p["status"] == "problems"}
    assert "dns cloudflare _acme-challenge.mx.example.test" in problems
    assert "fly app demo-inbound" in problems
    # Live endpoints are still fine: the problems are only in what the next run needs.
    assert all(e["status"] == "ok" for c in bad["certificates"] for e in c["endpoints"])
    for secret in wrong.values():
        assert secret not in json.dumps(bad)
