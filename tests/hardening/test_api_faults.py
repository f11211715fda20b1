"""Faults at the APIs (issue 5): Cloudflare 429/5xx/timeouts/an existing record, Fly
429/5xx on any call, a lease held by someone else, a machine that never starts or fails
its checks mid-rollout, MailPace down.

Each ends either in success after bounded retries or in a failed run (exit 1) that says
what failed, with nothing half-done that the next run cannot finish. The retries taken
(counted at the emulators) and the time to give up are printed (``pytest -s``).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests

from emulators.world import SUBMISSION_APP, ZONE_ID, LocalWorld
from renewer.dns_cloudflare import CloudflareDns, cloudflare_session
from renewer.sensitive import Secret
from tests.hardening.conftest import (
    CliResult,
    Runs,
    fingerprints_served,
    fly_submission_config,
    print_figures,
)

pytestmark = pytest.mark.integration

RELAY_TXT = "_acme-challenge.relay.example.test"


def _challenges(world: LocalWorld) -> list[dict[str, Any]]:
    return [r for r in world.cloudflare.records() if r["name"].startswith("_acme-challenge")]


def _cloudflare_faults(world: LocalWorld) -> int:
    return sum(1 for r in world.cloudflare.requests if r.status >= 429)


def _served(world: LocalWorld, result: CliResult, name: str) -> set[str]:
    return {e["serial"] for e in result.cert(name)["endpoints"]}


# -- Cloudflare ------------------------------------------------------------------------


def test_cloudflare_429_and_5xx_are_retried_to_success(runs: Runs) -> None:
    world = runs.world(with_fly=False)
    records = "/zones/*/dns_records"
    world.cloudflare.inject_fault("POST", records, status=429, retry_after=1)
    world.cloudflare.inject_fault("POST", records, status=502)
    world.cloudflare.inject_fault("DELETE", records + "/*", status=500)
    world.cloudflare.inject_fault("GET", records, status=503)
    result = runs.run(world)
    assert result.code == 0, result.output[-4000:]
    assert result.cert("relay")["action"] == "renewed"
    retries = _cloudflare_faults(world)
    assert retries == 4, [(r.method, r.path, r.status) for r in world.cloudflare.requests]
    assert "HTTP 429" in result.output and "retrying in 1.0s" in result.output
    assert _challenges(world) == []
    print_figures("Cloudflare 429+502+500+503", retries=retries, seconds=result.seconds)


def test_cloudflare_persistent_5xx_fails_the_run_and_the_next_run_finishes(runs: Runs) -> None:
    world = runs.world(with_fly=False)
    world.cloudflare.inject_fault("POST", "/zones/*/dns_records", status=500, times=5)
    failed = runs.run(world)
    assert failed.code == 1, failed.output[-4000:]
    relay = failed.cert("relay")
    assert relay["action"] == "failed"
    assert failed.report is not None and failed.report["error"]["step"] == "issue"
    message = failed.report["error"]["message"]
    assert "Cloudflare" in message and "HTTP 500" in message and "create TXT" in message
    attempts = sum(1 for r in world.cloudflare.requests if r.status == 500)
    assert attempts == 5  # ApiSession's max_attempts, then it gives up
    assert _challenges(world) == []
    assert relay["targets"] == [] or all(t["status"] != "deployed" for t in relay["targets"])
    print_figures(
        "Cloudflare 500 on every create",
        attempts=attempts,
        seconds_to_give_up=failed.seconds,
        exit=failed.code,
    )

    again = runs.run(world)
    assert again.code == 0, again.output[-4000:]
    assert again.cert("relay")["action"] == "renewed"
    assert _challenges(world) == []


def test_cloudflare_timeout_on_create_is_retried_and_the_applied_record_reused(
    runs: Runs,
) -> None:
    """A create that times out but was applied (the emulator serves it after the delay):
    the retry meets the duplicate (81058) and reuses the record, which is then deleted.
    The run's client timeout is fixed at 30 s (``ApiSession``), so this drives the DNS
    provider itself with a short timeout, against the same emulator."""
    world = runs.world(with_fly=False, with_dotenv=False, with_notify=False)
    session = cloudflare_session(
        world.cloudflare.base_url, Secret(world.cloudflare_token), timeout=0.5
    )
    dns = CloudflareDns(
        world.cloudflare.base_url,
        Secret(world.cloudflare_token),
        {"example.test": ZONE_ID},
        session=session,
    )
    world.cloudflare.inject_fault("POST", "/zones/*/dns_records", status=200, delay=1.5)
    started = time.monotonic()
    record = dns.create_txt("_acme-challenge.mx.example.test", "token-value-1")
    took = time.monotonic() - started
    assert record.record_id is not None
    posts = [r for r in world.cloudflare.requests if r.method == "POST"]
    live = _challenges(world)
    assert len(live) == 1 and live[0]["id"] == record.record_id  # one record, not two
    assert len(posts) == 2  # the timed-out try (applied) and the retry that met the duplicate
    dns.delete_txt(record)
    assert _challenges(world) == []
    print_figures("Cloudflare create slower than the 0.5 s timeout", retries=1, seconds=took)

    # Never answering: bounded by attempts x timeout (+ backoff), then a clear error.
    world.cloudflare.inject_fault("GET", "/zones/*/dns_records", status=200, delay=3, times=5)
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out after 5 attempt") as caught:
        dns.list_stale_txt("_acme-challenge.mx.example.test")
    gave_up = time.monotonic() - started
    assert gave_up < 12
    assert world.cloudflare_token not in str(caught.value)
    print_figures("Cloudflare never answering", attempts=5, seconds_to_give_up=gave_up)


def test_existing_records_ours_are_cleaned_foreign_ones_kept(runs: Runs) -> None:
    world = runs.world(with_fly=False)
    ours = world.cloudflare.add_record(
        ZONE_ID, RELAY_TXT, '"left-by-a-crashed-run"', "cert-renewer"
    )
    foreign = world.cloudflare.add_record(ZONE_ID, RELAY_TXT, '"another-acme-client"', None)
    result = runs.run(world)
    assert result.code == 0, result.output[-4000:]
    left = {r["id"] for r in _challenges(world)}
    assert ours not in left, "our stale record was not removed"
    assert left == {foreign}, "a record we did not create must stay"
    assert "Removing stale TXT record" in result.output


# -- Fly -------------------------------------------------------------------------------


def _fly_faults(world: LocalWorld) -> list[tuple[str, str, int]]:
    assert world.fly is not None
    return [(r.method, r.path, r.status) for r in world.fly.request_log if r.status >= 429]


def test_fly_429_and_5xx_on_every_kind_of_call_are_retried(runs: Runs) -> None:
    world = runs.world(with_dotenv=False)
    assert world.fly is not None
    fly_submission_config(world, wait_timeout=10)
    app = rf"/apps/{SUBMISSION_APP}"
    world.fly.inject_fault("POST", app + r"/secrets$", 429, retry_after=1)
    world.fly.inject_fault("GET", app + r"/machines$", 503)
    world.fly.inject_fault("POST", app + r"/machines/[0-9a-f]+/lease$", 500)
    world.fly.inject_fault("GET", app + r"/machines/[0-9a-f]+$", 502)
    world.fly.inject_fault("POST", app + r"/machines/[0-9a-f]+$", 503)
    world.fly.inject_fault("GET", app + r"/machines/[0-9a-f]+/wait$", 504)
    world.fly.inject_fault("DELETE", app + r"/machines/[0-9a-f]+/lease$", 500)
    result = runs.run(world)
    assert result.code == 0, result.output[-4000:]
    faults = _fly_faults(world)
    assert len(faults) == 7, faults
    assert world.fly.secrets_calls(SUBMISSION_APP) == 1
    assert world.fly.overlapping_updates(SUBMISSION_APP) == []
    fingerprint = result.cert("submission")["fingerprint_sha256"]
    assert fingerprints_served(world) == {fingerprint}
    print_figures(
        "Fly 429/5xx once on 7 kinds of call", retries=len(faults), seconds=result.seconds
    )


def test_fly_persistent_5xx_on_secrets_fails_before_any_machine(runs: Runs) -> None:
    world = runs.world(with_dotenv=False)
    assert world.fly is not None
    fly_submission_config(world)
    world.fly.inject_fault("POST", rf"/apps/{SUBMISSION_APP}/secrets$", 503, times=5)
    failed = runs.run(world)
    assert failed.code == 1, failed.output[-4000:]
    target = failed.cert("submission")["targets"][0]
    assert target["status"] == "failed"
    assert "demo-submission" in target["detail"] and "HTTP 503" in target["detail"]
    assert world.fly.update_timeline(SUBMISSION_APP) == []  # no machine touched
    print_figures(
        "Fly 503 on every secrets call",
        attempts=len(_fly_faults(world)),
        seconds_to_give_up=failed.seconds,
        exit=failed.code,
    )
    again = runs.run(world)
    assert again.code == 0, again.output[-4000:]
    fingerprint = again.cert("submission")["fingerprint_sha256"]
    assert fingerprints_served(world) == {fingerprint}


def _take_lease(world: LocalWorld, machine_id: str) -> str:
    """Someone else (another operator's flyctl) takes the machine's lease."""
    assert world.fly is not None
    response = requests.post(
        f"{world.fly.base_url}/v1/apps/{SUBMISSION_APP}/machines/{machine_id}/lease",
        json={"ttl": 300, "description": "flyctl deploy by someone else"},
        headers={"Authorization": world.fly_token},
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["data"]["nonce"])


def _release_lease(world: LocalWorld, machine_id: str, nonce: str) -> None:
    assert world.fly is not None
    requests.delete(
        f"{world.fly.base_url}/v1/apps/{SUBMISSION_APP}/machines/{machine_id}/lease",
        headers={"Authorization": world.fly_token, "fly-machine-lease-nonce": nonce},
        timeout=10,
    ).raise_for_status()


@pytest.mark.parametrize("fault", ["lease_held", "never_starts", "fails_checks"])
def test_fly_machine_failure_mid_rollout(runs: Runs, fault: str) -> None:
    """The rollout stops at the failing machine; the machines after it are untouched;
    the report names the machine; after the fault clears, the next run finishes."""
    world = runs.world(with_dotenv=False)
    assert world.fly is not None
    fly_submission_config(world)
    first_id, second_id = world.fly.machine_ids(SUBMISSION_APP)
    # The rollout goes in id order: break the first machine, watch the second.
    second_before = world.fly.machine(SUBMISSION_APP, second_id).instance_id
    nonce = ""
    if fault == "lease_held":
        nonce = _take_lease(world, first_id)
    elif fault == "never_starts":
        world.fly.machine_never_starts(SUBMISSION_APP, first_id)
    else:
        world.fly.machine_fails_checks(SUBMISSION_APP, first_id)
    failed = runs.run(world)
    assert failed.code == 1, failed.output[-4000:]
    cert = failed.cert("submission")
    assert cert["action"] == "failed"
    detail = cert["targets"][0]["detail"]
    assert cert["targets"][0]["status"] == "failed"
    assert f"machine {first_id}" in detail, detail
    expected = {
        "lease_held": "lease is held by another client",
        "never_starts": "did not reach state started",
        "fails_checks": "health checks not passing",
    }[fault]
    assert expected in detail, detail
    assert world.fly.machine(SUBMISSION_APP, second_id).instance_id == second_before
    assert failed.report is not None and failed.report["error"]["step"] == "deploy"
    print_figures(f"Fly {fault} on the first machine", seconds_to_give_up=failed.seconds)

    if fault == "lease_held":
        _release_lease(world, first_id, nonce)
    world.fly.clear_faults()
    if fault == "never_starts":
        # Clearing the fault does not boot the stuck machine; an operator restarts it.
        requests.post(
            f"{world.fly.base_url}/v1/apps/{SUBMISSION_APP}/machines/{first_id}/restart",
            headers={"Authorization": world.fly_token},
            timeout=10,
        ).raise_for_status()
        world.fly.wait_until(
            lambda: (
                world.fly is not None
                and world.fly.machine(SUBMISSION_APP, first_id).state == "started"
            )
        )
    again = runs.run(world)
    assert again.code == 0, again.output[-4000:]
    assert again.cert("submission")["action"] == "renewed", again.output[-3000:]
    fingerprint = again.cert("submission")["fingerprint_sha256"]
    assert fingerprints_served(world) == {fingerprint}
    assert world.fly.overlapping_updates(SUBMISSION_APP) == []


# -- MailPace --------------------------------------------------------------------------


def test_mailpace_down_fails_the_run_but_keeps_the_certificate(runs: Runs) -> None:
    world = runs.world(with_fly=False)
    assert world.mailpace is not None
    world.mailpace.go_down()
    failed = runs.run(world)
    assert failed.code == 1, failed.output[-4000:]
    assert failed.report is not None
    assert failed.report["status"] == "failed"
    assert failed.report["error"]["step"] == "report"
    assert "MailPace" in failed.report["error"]["message"]
    relay = failed.cert("relay")
    assert relay["action"] == "renewed"  # the certificate work stands
    assert relay["endpoints"][0]["matches_new"] is True
    assert "Report email FAILED" in failed.stdout
    print_figures("MailPace down", attempts=5, seconds_to_give_up=failed.seconds)

    world.mailpace.come_up()
    again = runs.run(world)
    assert again.code == 0, again.output[-4000:]
    assert again.report is not None and again.report["status"] == "nothing_due"
    assert _served(world, again, "relay") == {relay["serial"]}
    assert len(world.mailpace.messages) == 1
    assert (world.mailpace.messages[0].subject or "").startswith("Nothing due: relay")
