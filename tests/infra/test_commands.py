"""The commands the program declares, executed as declared against the Fly emulator.

The program runs under mocks; ``CommandRunner`` plays pulumi-command's part and runs each
declared ``create``/``update``/``delete`` string with ``/bin/sh -c`` in the project
directory, with the declared environment and stdin. So this covers the provisioning CLI,
the rendering and the wiring between commands (the secrets version flowing into the
machine spec) in one go: create, run again (nothing runs, no duplicate machine), update in
place, destroy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulators.fly_api import FlyApi
from renewer.fly import FlyClient
from renewer.sensitive import Secret
from tests.infra.conftest import (
    FAKE_SECRETS,
    REPO,
    SCOPED_CF_TOKEN,
    CommandRunner,
    RecordingMocks,
    environ_without_tokens,
    prod_config,
    run_program,
)

APP = "example-cert-renewer"
ORG_TOKEN = FAKE_SECRETS["cert-renewer:flyProvisionToken"]
TARGETS_TOKEN = FAKE_SECRETS["cert-renewer:flyApiToken"].removeprefix("FlyV1 ")
IMAGE_V1 = "registry.fly.io/example-cert-renewer:v1"
IMAGE_V2 = "registry.fly.io/example-cert-renewer:v2"

pytestmark = pytest.mark.integration


@pytest.fixture
def fly(tmp_path: Path) -> Iterator[FlyApi]:
    tokens: dict[str, frozenset[str] | None] = {
        ORG_TOKEN: None,  # an org token: may create apps
        TARGETS_TOKEN: frozenset({"example-smtp", "example-mx"}),
    }
    with FlyApi(tmp_path / "fly", tokens=tokens, org_slug="example-org") as api:
        yield api


@pytest.fixture
def runner(mocks: RecordingMocks) -> CommandRunner:
    runner = CommandRunner(REPO, environ_without_tokens())
    mocks.command_runner = runner
    return runner


def _up(mocks: RecordingMocks, runner: CommandRunner, **overrides: object) -> list[tuple[str, str]]:
    """One `pulumi up`: the program, then the engine's deletes; returns what ran."""
    runner.executed.clear()
    mocks.registrations.clear()
    mocks.stack_outputs.clear()
    run_program(mocks, prod_config(**overrides))
    runner.finish()
    return list(runner.executed)


def _only_machine(fly: FlyApi) -> Any:
    ids = fly.machine_ids(APP)
    assert len(ids) == 1, f"expected exactly one machine, found {ids}"
    return fly.machine(APP, ids[0])


def test_create_rerun_update_destroy(
    fly: FlyApi, mocks: RecordingMocks, runner: CommandRunner
) -> None:
    settings = {"flyApiBaseUrl": fly.base_url, "image": IMAGE_V1}

    # create
    ran = _up(mocks, runner, **settings)
    assert ran == [
        ("renewer-app", "create"),
        ("renewer-secrets", "create"),
        ("renewer-machine", "create"),
    ]
    machine = _only_machine(fly)
    assert machine.config["schedule"] == "weekly"
    assert machine.config["restart"]["policy"] == "no"
    assert machine.config["image"] == IMAGE_V1
    renewer = json.loads(machine.config["env"]["RENEWER_CONFIG"])
    assert renewer["certificates"][0]["domains"] == ["smtp.example.com", "mail.example.com"]
    assert fly.secret_value(APP, "CLOUDFLARE_API_TOKEN") == SCOPED_CF_TOKEN
    assert fly.secret_value(APP, "FLY_API_TOKEN") == FAKE_SECRETS["cert-renewer:flyApiToken"]
    assert fly.secret_value(APP, "MAILPACE_TOKEN") == FAKE_SECRETS["cert-renewer:mailpaceToken"]
    assert fly.secret_value(APP, "ACME_ACCOUNT_KEY") is not None
    assert fly.secret_value(APP, "RFC2136_TSIG_SECRET") is None
    assert machine.config["metadata"]["cert_renewer_secrets_version"] == str(
        fly.secrets_version(APP)
    )
    assert mocks.stack_outputs["machineId"][0] == machine.id
    first_id, first_instance = machine.id, machine.instance_id
    secrets_calls = fly.secrets_calls(APP)
    # What the commands printed (kept by Pulumi as outputs) holds no secret.
    for state in runner.state.values():
        for secret in [*FAKE_SECRETS.values(), SCOPED_CF_TOKEN, TARGETS_TOKEN]:
            assert secret not in state.outputs["stdout"] + state.outputs["stderr"]

    # run again, nothing changed: nothing runs, still one machine, same version
    assert _up(mocks, runner, **settings) == []
    again = _only_machine(fly)
    assert (again.id, again.instance_id) == (first_id, first_instance)
    assert fly.secrets_calls(APP) == secrets_calls
    assert mocks.stack_outputs["machineId"][0] == first_id

    # negative control for "nothing runs": the provisioning verb itself is idempotent too
    runner.run(
        runner.state["renewer-machine"].inputs["update"], runner.state["renewer-machine"].inputs
    )
    assert _only_machine(fly).instance_id == first_instance

    # update: a new image and schedule update the same machine in place
    ran = _up(mocks, runner, **{**settings, "image": IMAGE_V2, "schedule": "daily"})
    assert ran == [("renewer-machine", "update")]
    updated = _only_machine(fly)
    assert updated.id == first_id
    assert updated.instance_id != first_instance
    assert updated.config["image"] == IMAGE_V2
    assert updated.config["schedule"] == "daily"
    assert updated.config["restart"]["policy"] == "no"

    # a rotated secret: one secrets call, then the machine is updated to the new version
    version = fly.secrets_version(APP)
    ran = _up(
        mocks,
        runner,
        **{**settings, "image": IMAGE_V2, "schedule": "daily", "mailpaceToken": "MAILPACE-NEW"},
    )
    assert ran == [("renewer-secrets", "update"), ("renewer-machine", "update")]
    assert fly.secret_value(APP, "MAILPACE_TOKEN") == "MAILPACE-NEW"
    assert fly.secrets_version(APP) == version + 1
    rotated = _only_machine(fly)
    assert rotated.id == first_id
    assert rotated.config["metadata"]["cert_renewer_secrets_version"] == str(version + 1)

    # destroy: the machine, then the app
    runner_state = {name: state.inputs for name, state in runner.state.items()}
    runner.executed.clear()
    runner.destroy()
    assert runner.executed == [
        ("renewer-machine", "delete"),
        ("renewer-secrets", "delete"),
        ("renewer-app", "delete"),
    ]
    with FlyClient(fly.base_url, Secret(ORG_TOKEN)) as client:
        assert client.get_app(APP) is None
    # destroy again (a retried `pulumi destroy`): the verbs find nothing and succeed
    runner.run(runner_state["renewer-machine"]["delete"], runner_state["renewer-machine"])
    runner.run(runner_state["renewer-app"]["delete"], runner_state["renewer-app"])


def test_secrets_go_by_stdin_and_environment_never_argv(
    fly: FlyApi, mocks: RecordingMocks, runner: CommandRunner
) -> None:
    _up(mocks, runner, flyApiBaseUrl=fly.base_url, image=IMAGE_V1)
    argv_seen = " ".join(
        s.inputs.get(k) or "" for s in runner.state.values() for k in ("create", "update", "delete")
    )
    for secret in [*FAKE_SECRETS.values(), SCOPED_CF_TOKEN]:
        assert secret not in argv_seen
    # ...and yet they arrived (positive control)
    assert fly.secret_value(APP, "CLOUDFLARE_API_TOKEN") == SCOPED_CF_TOKEN


def test_a_target_token_cannot_create_the_app(
    fly: FlyApi, mocks: RecordingMocks, runner: CommandRunner
) -> None:
    # Without flyProvisionToken the target-scoped token is used, and Fly refuses: the
    # failure is loud and names the app, not the token.
    with pytest.raises(Exception, match="command failed") as caught:
        _up(mocks, runner, flyApiBaseUrl=fly.base_url, image=IMAGE_V1, flyProvisionToken=None)
    assert "ensure-app example-cert-renewer" in str(caught.value)
    assert TARGETS_TOKEN not in str(caught.value)
