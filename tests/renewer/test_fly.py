"""FlyClient against the Fly emulator: auth header forms, scopes, error shapes, retries,
leases and waits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulators.fly_api import FlyApi, MachineSpec
from renewer.errors import ApiError
from renewer.fly import (
    FlyClient,
    LeaseConflictError,
    WaitTimeoutError,
    authorization_header,
)
from renewer.sensitive import Secret

ORG = "fm2_org0123456789"
ONLY_A = "fm2_deployA0123456789"
ONLY_B = "fm2_deployB0123456789"
OAUTH = "oauth0123456789"


@pytest.mark.parametrize(
    ("token", "header"),
    [
        ("fm2_abc", "FlyV1 fm2_abc"),
        ("FlyV1 fm2_abc", "FlyV1 fm2_abc"),
        ("FlyV1 fm2_abc,fm2_def", "FlyV1 fm2_abc,fm2_def"),
        ("Bearer FlyV1 fm2_abc", "FlyV1 fm2_abc"),
        ("FlyV1 FlyV1 fm1r_x, fm1a_y", "FlyV1 fm1r_x,fm1a_y"),
        ("  FlyV1 fm2_abc  ", "FlyV1 fm2_abc"),
        ("oauthtoken", "Bearer oauthtoken"),
        ("Bearer oauthtoken", "Bearer oauthtoken"),
        ("fm3_abc", "Bearer fm3_abc"),  # negative control: not a macaroon prefix
        ("fm2abc", "Bearer fm2abc"),
    ],
)
def test_authorization_header_as_fly_go_builds_it(token: str, header: str) -> None:
    assert authorization_header(token) == header


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FlyApi]:
    tokens = {ORG: None, OAUTH: None, ONLY_A: frozenset({"app-a"}), ONLY_B: frozenset({"app-b"})}
    with FlyApi(tmp_path / "fly", tokens=tokens) as running:
        yield running


def _client(api: FlyApi, token: str, sleeps: list[float] | None = None) -> FlyClient:
    recorder = sleeps if sleeps is not None else []
    return FlyClient(api.base_url, Secret(token), timeout=5, max_attempts=4, sleep=recorder.append)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("token", "scheme"),
    [
        (f"FlyV1 {ORG}", "FlyV1"),
        (ORG, "FlyV1"),
        (f"Bearer {ORG}", "FlyV1"),
        (OAUTH, "Bearer"),
        (f"FlyV1 {ONLY_B},{ONLY_A}", "FlyV1"),
    ],
)
def test_each_token_form_is_accepted(api: FlyApi, token: str, scheme: str) -> None:
    api.add_app("app-a")
    app = _client(api, token).get_app("app-a")
    assert app is not None
    assert app.name == "app-a"
    assert api.request_log[-1].auth_scheme == scheme


@pytest.mark.integration
def test_apps_lifecycle_and_error_shapes(api: FlyApi) -> None:
    client = _client(api, ORG)
    assert client.get_app("app-a") is None
    created = client.create_app("app-a", "personal")
    assert created.name == "app-a"
    assert created.org_slug == "personal"
    with pytest.raises(ApiError) as taken:
        client.create_app("app-a", "personal")
    assert taken.value.status == 422
    assert taken.value.code == "name_taken"
    assert "Name has already been taken" in str(taken.value)
    api.add_foreign_app("theirs")
    with pytest.raises(ApiError) as foreign:
        client.get_app("theirs")
    assert foreign.value.status == 403
    assert [a.name for a in client.list_apps("personal")] == ["app-a"]
    client.delete_app("app-a")
    assert client.get_app("app-a") is None


@pytest.mark.integration
def test_a_token_for_app_a_cannot_touch_app_b(api: FlyApi) -> None:
    api.add_app("app-a", [MachineSpec(state="stopped")])
    api.add_app("app-b", [MachineSpec(state="stopped")])
    client = _client(api, f"FlyV1 {ONLY_A}")
    assert client.set_secrets("app-a", {"X": Secret("1")}) == 1
    with pytest.raises(ApiError) as info:
        client.set_secrets("app-b", {"X": Secret("value-that-must-not-leak")})
    assert info.value.status == 403
    assert "app-b" in info.value.message
    assert ONLY_A not in str(info.value)
    assert "value-that-must-not-leak" not in str(info.value)
    with pytest.raises(ApiError):
        client.list_machines("app-b")
    assert api.secrets_calls("app-b") == 0
    assert api.secrets_calls("app-a") == 1


@pytest.mark.integration
def test_secrets_version_and_listing(api: FlyApi) -> None:
    api.add_app("app-a")
    client = _client(api, ORG)
    first = client.set_secrets("app-a", {"PRIVATEKEY": Secret("k"), "FULLCHAIN": Secret("c")})
    second = client.set_secrets("app-a", {"PRIVATEKEY": None})
    assert second == first + 1
    listed = client.list_secrets("app-a")
    assert [s.name for s in listed] == ["FULLCHAIN"]
    assert listed[0].digest


@pytest.mark.integration
def test_429_and_5xx_are_retried_and_400_is_not(api: FlyApi) -> None:
    api.add_app("app-a")
    sleeps: list[float] = []
    client = _client(api, ORG, sleeps)
    api.inject_fault("POST", r"/secrets$", 429, times=1, retry_after=2)
    api.inject_fault("POST", r"/secrets$", 503, times=1)
    assert client.set_secrets("app-a", {"X": Secret("1")}) == 1
    assert sleeps[0] == 2.0
    assert len(sleeps) == 2
    assert api.secrets_calls("app-a") == 1
    api.inject_fault("GET", r"/apps/app-a$", 400, times=1)
    with pytest.raises(ApiError) as info:
        client.get_app("app-a")
    assert info.value.status == 400
    assert "injected fault" in info.value.message
    assert len(sleeps) == 2  # no retry on 400


@pytest.mark.integration
def test_persistent_5xx_gives_up(api: FlyApi) -> None:
    api.add_app("app-a")
    sleeps: list[float] = []
    api.inject_fault("GET", r"/machines$", 502, times=10)
    with pytest.raises(ApiError) as info:
        _client(api, ORG, sleeps).list_machines("app-a")
    assert info.value.status == 502
    assert len(sleeps) == 3  # four attempts


@pytest.mark.integration
def test_machine_update_under_lease_and_wait(api: FlyApi) -> None:
    [machine_id] = api.add_app("app-a", [MachineSpec()])
    client = _client(api, ORG)
    started = client.wait_for_state("app-a", machine_id, "started", timeout=10)
    assert started.state == "started"
    nonce = client.acquire_lease("app-a", machine_id, 30)
    other = _client(api, OAUTH)
    with pytest.raises(LeaseConflictError) as conflict:
        other.acquire_lease("app-a", machine_id, 30)
    assert conflict.value.status == 409
    with pytest.raises(ApiError) as no_nonce:
        client.update_machine("app-a", machine_id, {"config": started.config}, None)
    assert no_nonce.value.status == 409
    client.refresh_lease("app-a", machine_id, nonce, 60)
    updated = client.update_machine("app-a", machine_id, {"config": started.config}, nonce)
    assert updated.instance_id != started.instance_id
    # A 404 right after the update is retried (fly-api.md 4.4).
    api.inject_fault("GET", r"/wait$", 404, times=1)
    after = client.wait_for_state(
        "app-a", machine_id, "started", version=updated.instance_id, timeout=10
    )
    assert after.instance_id == updated.instance_id
    client.release_lease("app-a", machine_id, nonce)
    client.release_lease("app-a", machine_id, nonce)  # already gone: not an error
    assert other.acquire_lease("app-a", machine_id, 30)


@pytest.mark.integration
def test_wait_loops_on_408_then_times_out(api: FlyApi) -> None:
    [machine_id] = api.add_app("app-a", [MachineSpec(state="stopped")])
    client = _client(api, ORG)
    api.inject_fault("GET", r"/wait$", 408, times=1)  # an early "not yet" is looped over
    with pytest.raises(WaitTimeoutError) as info:
        client.wait_for_state("app-a", machine_id, "started", timeout=2)
    assert machine_id in info.value.message
    waits = [e for e in api.request_log if e.path.endswith("/wait")]
    assert len(waits) == 2
    assert all(e.status == 408 for e in waits)
    assert all("timeout=" in e.query for e in waits)


@pytest.mark.integration
def test_create_start_stop_delete_machine(api: FlyApi) -> None:
    api.add_app("app-a")
    client = _client(api, ORG)
    machine = client.create_machine(
        "app-a",
        {"region": "cdg", "config": {"image": "registry.fly.io/app-a:v1"}, "skip_launch": True},
    )
    assert machine.state == "created"
    client.start_machine("app-a", machine.id)
    client.wait_for_state("app-a", machine.id, "started", timeout=10)
    with pytest.raises(ApiError) as running:
        client.delete_machine("app-a", machine.id)
    assert running.value.status == 412
    client.stop_machine("app-a", machine.id)
    assert client.get_machine("app-a", machine.id).state == "stopped"
    client.delete_machine("app-a", machine.id)
    assert client.list_machines("app-a") == []
