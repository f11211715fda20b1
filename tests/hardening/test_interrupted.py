"""Interrupted runs (issue 5): ``python -m renewer run --force`` killed with SIGKILL at
each step in turn. Each kill point is made deterministic by an emulator fault that holds
the *next* call for a minute (so nothing after the step can happen), and the kill is
sent as soon as the step is seen (the process's own log line, or the emulator's state).

After each kill: every machine still serves a valid certificate (the old or the new),
and the next (unforced) run completes and leaves no ``_acme-challenge`` record behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from emulators.world import SUBMISSION_APP, LocalWorld
from tests.hardening.conftest import (
    Runs,
    Spawned,
    assert_every_machine_serves_a_valid_certificate,
    fly_submission_config,
    print_figures,
)

pytestmark = pytest.mark.integration

HOLD = 60.0  # seconds a held call waits: far longer than the kill takes


def _challenge_records(world: LocalWorld) -> list[str]:
    api = [r["name"] for r in world.cloudflare.records() if "_acme-challenge" in r["name"]]
    served = [n for n in world.store.names() if n.startswith("_acme-challenge")]
    return api + [n for n in served if world.store.values(n, "TXT")]


def _hold_delete(world: LocalWorld) -> Callable[[Spawned], bool]:
    # The cleanup DELETE is held (and then refused): the record stays while we kill.
    api = world.cloudflare
    before = sum(1 for r in api.requests if r.method == "DELETE")
    api.inject_fault("DELETE", "/zones/*/dns_records/*", status=500, delay=HOLD)
    return lambda _spawned: sum(1 for r in api.requests if r.method == "DELETE") > before


def _hold_secrets(world: LocalWorld) -> Callable[[Spawned], bool]:
    assert world.fly is not None
    world.fly.inject_fault("POST", rf"/apps/{SUBMISSION_APP}/secrets$", 503, delay=HOLD)
    return lambda spawned: "setting secrets" in spawned.text()


def _hold_after_secrets(world: LocalWorld) -> Callable[[Spawned], bool]:
    fly = world.fly
    assert fly is not None
    before = fly.secrets_calls(SUBMISSION_APP)
    first, _ = fly.machine_ids(SUBMISSION_APP)
    # The first machine's lease is the next call that changes anything (the machine list
    # is also read by the decision, so it cannot be the one held).
    fly.inject_fault("POST", rf"/machines/{first}/lease$", 503, delay=HOLD)
    return lambda _spawned: fly.secrets_calls(SUBMISSION_APP) > before


def _hold_second_machine(world: LocalWorld) -> Callable[[Spawned], bool]:
    fly = world.fly
    assert fly is not None
    first, second = fly.machine_ids(SUBMISSION_APP)
    fly.inject_fault("POST", rf"/machines/{second}/lease$", 503, delay=HOLD)
    pattern = re.compile(rf"machine {first}: lease released")
    return lambda spawned: bool(pattern.search(spawned.text()))


KILL_POINTS = {
    "after the TXT record is created": _hold_delete,
    "after issuance": _hold_secrets,
    "after the secrets call": _hold_after_secrets,
    "between two machine updates": _hold_second_machine,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_each_step_then_the_next_run_finishes(runs: Runs, point: str) -> None:
    world = runs.world(with_dotenv=False)
    assert world.fly is not None
    fly_submission_config(world)
    first = runs.run(world)  # a valid certificate is live before the interrupted run
    assert first.code == 0, first.output[-4000:]
    old = first.cert("submission")["fingerprint_sha256"]

    reached = KILL_POINTS[point](world)
    spawned = runs.spawn(world, "--force")
    waited = spawned.wait_for(lambda: reached(spawned), timeout=60, what=point)
    spawned.kill()
    world.fly.clear_faults()
    print_figures(f"SIGKILL {point}", seconds_until_kill=waited)

    if point == "after the TXT record is created":
        assert _challenge_records(world), "the kill left no record: the fault was not exercised"
    # Every machine still serves a valid certificate: the old one or the new one.
    served = assert_every_machine_serves_a_valid_certificate(world)
    if point != "between two machine updates":
        assert served == {old}, "nothing was deployed before the kill"
    else:
        assert old in served and len(served) == 2, "one machine new, one old"

    after = runs.run(world)
    assert after.code == 0, after.output[-4000:]
    assert _challenge_records(world) == [], "an _acme-challenge record was left behind"
    final = assert_every_machine_serves_a_valid_certificate(world)
    assert len(final) == 1, "the machines disagree after the next run"
    assert world.fly.overlapping_updates(SUBMISSION_APP) == []
    print_figures(
        f"next run after SIGKILL {point}",
        status=after.report["status"] if after.report else None,
        seconds=after.seconds,
    )


def test_sigkill_while_a_machine_is_leased_then_the_next_run_finishes(runs: Runs) -> None:
    world = runs.world(with_dotenv=False)
    assert world.fly is not None
    fly_submission_config(world)
    first = runs.run(world)
    assert first.code == 0, first.output[-4000:]
    _, second = world.fly.machine_ids(SUBMISSION_APP)
    # Hold the update of the second machine: its lease is already taken.
    world.fly.inject_fault("POST", rf"/machines/{second}$", 503, delay=HOLD)
    spawned = runs.spawn(world, "--force")
    spawned.wait_for(
        lambda: f"machine {second}: leased" in spawned.text(), timeout=60, what="lease"
    )
    spawned.kill()
    world.fly.clear_faults()
    assert_every_machine_serves_a_valid_certificate(world)
    after = runs.run(world)
    assert after.code == 0, after.output[-4000:]
