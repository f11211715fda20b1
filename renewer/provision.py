"""``python -m renewer.provision``: the idempotent provisioning verbs Pulumi runs.

The Pulumi program (``infra/renewer_app.py``) declares one ``local.Command`` per step and
each runs one verb here, built on the same ``FlyClient`` the job uses. Every verb can run
any number of times: it reads what exists, changes only what differs, and prints one line
of non-secret JSON on stdout (Pulumi keeps it as the command's output). Progress goes to
stderr; secrets never reach argv, stdout or stderr.

Verbs (all take ``--app APP`` and ``--api-base-url URL``; the token is ``FLY_API_TOKEN``):

- ``ensure-app --org ORG``: create the app unless it exists -> ``{"app", "created"}``
- ``set-secrets [--unset NAME]...``: ``NAME=VALUE`` lines on stdin, set in one API call
  (fly-api.md 4.1) -> ``{"app", "version", "names", "unset"}``
- ``ensure-machine``: a JSON spec on stdin ``{"region", "config", "min_secrets_version"}``;
  creates the one scheduled machine, or updates it in place (leased) when its config
  differs, or does nothing -> ``{"app", "machine_id", "image", "action"}``
- ``destroy-machine``: delete the scheduled machine(s) -> ``{"app", "deleted"}``
- ``destroy``: delete the app with its machines and secrets -> ``{"app", "deleted"}``

Exit codes: 0 done, 1 the Fly API refused or failed, 2 bad usage or input.
This module never imports Pulumi.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from renewer.errors import ConfigError, RenewerError
from renewer.fly import FlyClient, Machine, MachineRequest
from renewer.sensitive import Secret

__all__ = ["MACHINE_ROLE", "main"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

TOKEN_ENV = "FLY_API_TOKEN"  # noqa: S105 - the variable name, not a token
# The metadata that marks the scheduled machine we own (same constant as infra/commands.py;
# a test keeps them equal, since neither package may import the other).
MACHINE_ROLE = ("cert_renewer_role", "scheduled-job")
LEASE_TTL = 60

_SECRET_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_APP = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_GONE = frozenset({"destroyed", "destroying"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"provision: usage error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m renewer.provision", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in ("ensure-app", "set-secrets", "ensure-machine", "destroy-machine", "destroy"):
        sub = verbs.add_parser(verb)
        sub.add_argument("--app", required=True)
        sub.add_argument("--api-base-url", default="https://api.machines.dev")
        if verb == "ensure-app":
            sub.add_argument("--org", required=True)
        if verb == "set-secrets":
            sub.add_argument("--unset", action="append", default=[], metavar="NAME")
    return parser


def parse_secret_lines(text: str) -> dict[str, Secret]:
    """``NAME=VALUE`` lines (blank lines and ``#`` comments skipped). Errors name the line
    number and the variable, never the value."""
    values: dict[str, Secret] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _SECRET_NAME.match(name):
            raise ConfigError(f"stdin line {number}", "expected NAME=VALUE")
        if not value:
            raise ConfigError(f"stdin line {number} ({name})", "the value is empty")
        if name in values:
            raise ConfigError(f"stdin line {number} ({name})", "the name is given twice")
        values[name] = Secret(value)
    return values


def parse_machine_spec(text: str) -> tuple[str, dict[str, Any], int | None]:
    """``(region, config, min_secrets_version)`` from the JSON spec on stdin."""
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise ConfigError("stdin", "expected the machine spec as JSON") from exc
    if not isinstance(spec, dict):
        raise ConfigError("stdin", "expected a JSON object")
    region = spec.get("region")
    config = spec.get("config")
    version = spec.get("min_secrets_version")
    if not isinstance(region, str) or not re.fullmatch(r"[a-z]{3}", region):
        raise ConfigError("region", "expected a three-letter Fly region")
    if not isinstance(config, dict) or not isinstance(config.get("image"), str):
        raise ConfigError("config", "expected an object with an 'image'")
    metadata = config.get("metadata")
    if not isinstance(metadata, dict) or metadata.get(MACHINE_ROLE[0]) != MACHINE_ROLE[1]:
        raise ConfigError("config.metadata", f"must mark the machine ({MACHINE_ROLE[0]})")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise ConfigError("min_secrets_version", "expected an integer or null")
    return region, config, version


def _contains(current: object, desired: object) -> bool:
    """Whether ``current`` already holds everything in ``desired``: the API adds defaults
    to a stored config (e.g. ``restart.max_retries``), which must not count as a change."""
    if isinstance(desired, Mapping):
        return isinstance(current, Mapping) and all(
            k in current and _contains(current[k], v) for k, v in desired.items()
        )
    return current == desired


def _ours(machine: Machine) -> bool:
    metadata = machine.config.get("metadata") or {}
    return machine.state not in _GONE and metadata.get(MACHINE_ROLE[0]) == MACHINE_ROLE[1]


def ensure_app(client: FlyClient, app: str, org: str) -> dict[str, object]:
    if client.get_app(app) is not None:
        log.info("app %s exists", app)
        return {"app": app, "created": False}
    client.create_app(app, org)
    log.info("created app %s in organization %s", app, org)
    return {"app": app, "created": True}


def set_secrets(
    client: FlyClient, app: str, values: Mapping[str, Secret], unset: Sequence[str]
) -> dict[str, object]:
    payload: dict[str, Secret | None] = dict(values)
    for name in unset:
        if name in payload:
            raise ConfigError(f"--unset {name}", "is also given a value on stdin")
        payload[name] = None
    version = client.set_secrets(app, payload)
    log.info("set %d secret(s), unset %d on %s: version %d", len(values), len(unset), app, version)
    return {"app": app, "version": version, "names": sorted(values), "unset": sorted(unset)}


def ensure_machine(
    client: FlyClient, app: str, region: str, config: Mapping[str, Any], version: int | None
) -> dict[str, object]:
    ours = [m for m in client.list_machines(app) if _ours(m)]
    same_region = [m for m in ours if m.region == region]
    keep = same_region[0] if same_region else None
    action = "unchanged"
    if keep is None:
        request: MachineRequest = {"config": config, "region": region}
        if version is not None:
            request["min_secrets_version"] = version
        machine = client.create_machine(app, request)
        action = "created"
        log.info("created scheduled machine %s in %s (%s)", machine.id, region, app)
    elif not _contains(keep.config, config):
        merged = {**keep.config, **config}
        update: MachineRequest = {"config": merged, "skip_launch": True}
        if version is not None:
            update["min_secrets_version"] = version
        # DESIGN.md: a machine is leased while it is updated.
        nonce = client.acquire_lease(app, keep.id, LEASE_TTL)
        try:
            machine = client.update_machine(app, keep.id, update, nonce)
        finally:
            client.release_lease(app, keep.id, nonce)
        action = "updated"
        log.info("updated scheduled machine %s in place (%s)", machine.id, app)
    else:
        machine = keep
        log.info("scheduled machine %s is up to date (%s)", machine.id, app)
    for extra in ours:
        if extra.id != machine.id:
            # A region change (immutable, fly-api.md 3.2) or a duplicate: one job only.
            client.delete_machine(app, extra.id, force=True)
            log.info("deleted extra scheduled machine %s (%s)", extra.id, app)
    image = machine.config.get("image", config["image"])
    return {"app": app, "machine_id": machine.id, "image": image, "action": action}


def destroy_machine(client: FlyClient, app: str) -> dict[str, object]:
    if client.get_app(app) is None:
        return {"app": app, "deleted": []}
    deleted = []
    for machine in client.list_machines(app):
        if _ours(machine):
            client.delete_machine(app, machine.id, force=True)
            deleted.append(machine.id)
            log.info("deleted scheduled machine %s (%s)", machine.id, app)
    return {"app": app, "deleted": deleted}


def destroy_app(client: FlyClient, app: str) -> dict[str, object]:
    if client.get_app(app) is None:
        log.info("app %s does not exist", app)
        return {"app": app, "deleted": False}
    client.delete_app(app, force=True)
    log.info("deleted app %s", app)
    return {"app": app, "deleted": True}


def run(args: argparse.Namespace, stdin: TextIO, env: Mapping[str, str]) -> dict[str, object]:
    if not _APP.match(args.app):
        raise ConfigError("--app", "expected a Fly app name (lowercase letters, digits, dashes)")
    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(TOKEN_ENV, "is required in the environment")
    with FlyClient(args.api_base_url, Secret(token)) as client:
        if args.verb == "ensure-app":
            return ensure_app(client, args.app, args.org)
        if args.verb == "set-secrets":
            return set_secrets(client, args.app, parse_secret_lines(stdin.read()), args.unset)
        if args.verb == "ensure-machine":
            region, config, version = parse_machine_spec(stdin.read())
            return ensure_machine(client, args.app, region, config, version)
        if args.verb == "destroy-machine":
            return destroy_machine(client, args.app)
        return destroy_app(client, args.app)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    logging.basicConfig(level=logging.INFO, format="provision: %(message)s", stream=sys.stderr)
    args = _parser().parse_args(argv)
    try:
        result = run(args, stdin or sys.stdin, os.environ if env is None else env)
    except ConfigError as exc:
        sys.stderr.write(f"provision: error: {exc}\n")
        return EXIT_USAGE
    except RenewerError as exc:
        sys.stderr.write(f"provision: error: {args.verb} {args.app}: {exc}\n")
        return EXIT_FAILED
    out = stdout or sys.stdout
    out.write(json.dumps(result, sort_keys=True) + "\n")
    out.flush()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
