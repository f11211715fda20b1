"""Pulumi unit-test harness: mocks replace only the engine, the program runs for real.

``RecordingMocks`` echoes inputs and records every resource and invoke; the
``RecordingMonitor`` also keeps each raw registration request, where secret values still
carry Pulumi's secret signature and ``additionalSecretOutputs`` is visible. ``run_program``
executes ``__main__.py`` with ``runpy`` (a fresh program per call) and waits for it.
Optionally, ``CommandRunner`` plays the engine's part for ``local.Command``: it runs the
declared command strings, with the declared environment and stdin, and diffs against the
previous run the way pulumi-command does (triggers replace, other changes update).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import runpy
import subprocess
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from google.protobuf import json_format  # type: ignore[import-untyped]

with warnings.catch_warnings():
    # cloudflare-mailpace-acme.md B.5: importing pulumi_cloudflare warns ~70 times.
    warnings.simplefilter("ignore", DeprecationWarning)
    import pulumi
    import pulumi_cloudflare  # noqa: F401  (imported once here, quietly)
    from pulumi.runtime.mocks import MockMonitor
    from pulumi.runtime.settings import get_root_resource

REPO = Path(__file__).resolve().parents[2]
PROJECT = "cert-renewer"
SECRET_SIG = "4dabf18193072939515e22adb298388d"
COMMAND = "command:local:Command"
API_TOKEN = "cloudflare:index/apiToken:ApiToken"

# Distinctive fake secrets: any occurrence outside a secret value is a leak.
FAKE_SECRETS = {
    "cert-renewer:flyApiToken": "FlyV1 fm2_TARGETS-SECRET-fly-token",
    "cert-renewer:flyProvisionToken": "fm2_PROVISION-SECRET-org-token",
    "cert-renewer:mailpaceToken": "MAILPACE-SECRET-token",
    "cert-renewer:acmeAccountKey": (
        "\x2d----BEGIN EC PRIVATE KEY-----\nACME-SECRET-key-material\n"
        "-----END EC PRIVATE KEY-----\n"
    ),
    "cloudflare:apiToken": "CF-PROVIDER-SECRET-token",
}
SCOPED_CF_TOKEN = "CF-SCOPED-SECRET-dns-token"
ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"
PERMISSION_GROUPS = [
    {"id": "c8fed203ed3043cba015a93ad1616f1f", "name": "Zone Read"},
    {"id": "4755a26eedb94da69e1066d98aa820be", "name": "DNS Write"},
    {"id": "82e64a83756745bbbb1c9c2701bf816b", "name": "DNS Read"},
    {"id": "e6d2666161e84845a636613608cee8d5", "name": "Zone Write"},
    {"id": "3030687196b94b638145a3953da2b699", "name": "Zone Settings Write"},
]


def prod_config(**overrides: object) -> dict[str, str]:
    """Pulumi.prod.yaml's config as the engine hands it to a program (objects as JSON),
    plus the fake secrets the runbook tells the operator to set."""
    data = yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())["config"]
    config: dict[str, object] = {**data, **FAKE_SECRETS}
    for key, value in overrides.items():
        full = key if ":" in key else f"{PROJECT}:{key}"
        if value is None:
            config.pop(full, None)
        else:
            config[full] = value
    return {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in config.items()}


@dataclass
class Registration:
    typ: str
    name: str
    inputs: dict[str, Any]
    raw: dict[str, Any]  # the serialized request object: secrets carry SECRET_SIG
    secret_outputs: list[str]
    dependencies: list[str] = field(default_factory=list)  # URNs this one waits for


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self, command_runner: CommandRunner | None = None) -> None:
        self.registrations: list[Registration] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.stack_outputs: dict[str, Any] = {}
        self.command_runner = command_runner

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        outputs = dict(args.inputs)
        if args.typ == API_TOKEN:
            outputs["value"] = SCOPED_CF_TOKEN
        if args.typ == COMMAND:
            if self.command_runner is not None:
                return args.name, self.command_runner.apply(args.name, args.inputs)
            outputs.setdefault("stdout", _canned_stdout(args.name))
            outputs.setdefault("stderr", "")
        return f"{args.name}-id", outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> Any:
        self.calls.append((args.token, dict(args.args)))
        if args.token == "cloudflare:index/getZone:getZone":
            name = args.args["filter"]["name"]
            return {"id": ZONE_ID, "zoneId": ZONE_ID, "name": name, "status": "active"}
        if args.token.endswith("getApiTokenPermissionGroupsList"):
            return {
                "results": [
                    {
                        **g,
                        "scopes": ["com.cloudflare.api.account.zone"],
                        "category": "Zone",
                        "isSelectable": True,
                    }
                    for g in PERMISSION_GROUPS
                ]
            }
        return {}


def _canned_stdout(name: str) -> str:
    if name.endswith("-secrets"):
        return json.dumps({"app": "x", "version": 7, "names": [], "unset": []})
    if name.endswith("-machine"):
        return json.dumps({"machine_id": "148ed599c12345", "image": "i", "action": "created"})
    return json.dumps({"ok": True})


class RecordingMonitor(MockMonitor):
    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.recording = mocks

    def RegisterResource(self, request: Any) -> Any:  # the gRPC method name
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.type != "pulumi:pulumi:Stack":
            raw = json_format.MessageToDict(request.object)
            inputs = pulumi.runtime.rpc.deserialize_properties(request.object)
            self.recording.registrations.append(
                Registration(
                    typ=request.type,
                    name=request.name,
                    inputs=inputs,
                    raw=raw,
                    secret_outputs=list(request.additionalSecretOutputs),
                    dependencies=list(request.dependencies),
                )
            )
        return response


@dataclass
class CommandState:
    inputs: dict[str, Any]
    outputs: dict[str, Any]


class CommandRunner:
    """The engine's part for ``local.Command``, per pulumi-command 1.2.1: ``triggers`` are
    replace-on-change (create the new, then delete the old); any other input change runs
    ``update``; no change runs nothing. Commands run as the provider runs them:
    ``/bin/sh -c <command>`` in the project directory, environment added to ours,
    stdin as given."""

    def __init__(self, cwd: Path, base_env: Mapping[str, str]) -> None:
        self.cwd = cwd
        self.base_env = dict(base_env)
        self.state: dict[str, CommandState] = {}
        self.executed: list[tuple[str, str]] = []  # (resource name, "create"|"update"|"delete")
        self._pending_deletes: list[CommandState] = []
        self._seen: list[str] = []

    def run(self, command: str, inputs: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
        env = {**self.base_env, **(inputs.get("environment") or {})}
        proc = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=self.cwd,
            env=env,
            input=inputs.get("stdin") or None,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"command failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def apply(self, name: str, declared: dict[str, Any]) -> dict[str, Any]:
        self._seen.append(name)
        inputs: dict[str, Any] = unwrap(declared)
        old = self.state.get(name)
        if old is not None and _comparable(old.inputs) == _comparable(inputs):
            return old.outputs
        if old is None or old.inputs.get("triggers") != inputs.get("triggers"):
            step, command = "create", inputs.get("create")
            if old is not None:
                self._pending_deletes.append(old)
        else:
            step, command = "update", inputs.get("update") or inputs.get("create")
        outputs = dict(inputs)
        outputs["stdout"], outputs["stderr"] = "", ""
        if command:
            proc = self.run(command, inputs)
            outputs["stdout"] = proc.stdout.rstrip("\n")
            outputs["stderr"] = proc.stderr.rstrip("\n")
        self.executed.append((name, step))
        self.state[name] = CommandState(copy.deepcopy(inputs), outputs)
        return outputs

    def finish(self) -> None:
        """After a run: delete replaced resources and those the program no longer declares."""
        for old in self._pending_deletes:
            if old.inputs.get("delete"):
                self.run(old.inputs["delete"], old.inputs)
        self._pending_deletes.clear()
        for name in [n for n in self.state if n not in self._seen]:
            self.destroy_one(name)
        self._seen.clear()

    def destroy_one(self, name: str) -> None:
        old = self.state.pop(name)
        if old.inputs.get("delete"):
            self.run(old.inputs["delete"], old.inputs)
        self.executed.append((name, "delete"))

    def destroy(self) -> None:
        """`pulumi destroy`: delete in reverse creation order (dependents first)."""
        for name in reversed(list(self.state)):
            self.destroy_one(name)


def unwrap(value: Any) -> Any:
    """The plain value, as the provider receives it after the engine decrypts secrets."""
    if isinstance(value, dict):
        if value.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            return unwrap(value.get("value"))
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def _comparable(inputs: Mapping[str, Any]) -> str:
    return json.dumps(inputs, sort_keys=True, default=str)


def run_program(mocks: RecordingMocks, config: Mapping[str, str], root: Path = REPO) -> None:
    """Runs ``root/__main__.py`` as `pulumi up` would (under the mocks), to completion."""
    pulumi.runtime.set_mocks(
        mocks, project=PROJECT, stack="prod", preview=False, monitor=RecordingMonitor(mocks)
    )
    pulumi.runtime.set_all_config(
        dict(config), secret_keys=[k for k in config if k in FAKE_SECRETS]
    )

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def program() -> pulumi.Output[Any]:
        runpy.run_path(str(root / "__main__.py"))
        stack = get_root_resource()
        outputs = dict(getattr(stack, "outputs", {}))
        # Each export's value and whether it is secret, awaited by pulumi.runtime.test.
        pairs = {
            name: pulumi.Output.all(value, pulumi.Output.from_input(_is_secret(value)))  # type: ignore[arg-type]
            for name, value in outputs.items()
        }
        return pulumi.Output.all(**pairs).apply(mocks.stack_outputs.update)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        program()


async def _is_secret(value: object) -> bool:
    return isinstance(value, pulumi.Output) and await value.is_secret()


def secret_values(raw: object) -> Iterator[object]:
    """Every value inside a secret wrapper of a serialized request."""
    if isinstance(raw, dict):
        if raw.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
            yield raw.get("value")
            return
        for value in raw.values():
            yield from secret_values(value)
    elif isinstance(raw, list):
        for value in raw:
            yield from secret_values(value)


def plain_text(raw: object) -> str:
    """The request with every secret wrapper removed: what may show in a diff or a log."""

    def strip(value: object) -> object:
        if isinstance(value, dict):
            if value.get(SECRET_SIG) == "1b47061264138c4ac30d75fd1eb44270":
                return "[secret]"
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(raw))


@pytest.fixture(autouse=True)
def quiet_failed_futures() -> Iterator[None]:
    """A program run that fails on purpose (a refused command) leaves Pulumi futures whose
    exception nobody reads; asyncio logs each one when it is collected, often at exit,
    far from the test. Collect them here, where the test already asserted the failure."""
    logger = logging.getLogger("asyncio")
    level = logger.level
    yield
    logger.setLevel(logging.CRITICAL)
    try:
        gc.collect()
    finally:
        logger.setLevel(level)


@pytest.fixture(autouse=True)
def mocks() -> RecordingMocks:
    recording = RecordingMocks()
    pulumi.runtime.set_mocks(
        recording, project=PROJECT, stack="prod", preview=False, monitor=RecordingMonitor(recording)
    )
    return recording


@pytest.fixture
def program(mocks: RecordingMocks) -> Callable[..., RecordingMocks]:
    def run(root: Path = REPO, **overrides: object) -> RecordingMocks:
        run_program(mocks, prod_config(**overrides), root)
        return mocks

    return run


def commands_of(mocks: RecordingMocks) -> dict[str, Registration]:
    return {r.name: r for r in mocks.registrations if r.typ == COMMAND}


def environ_without_tokens() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "TOKEN" not in k}
