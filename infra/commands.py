"""Pure renderers for the provisioning commands that ``RenewerApp`` declares.

Each ``local.Command`` runs ``python -m renewer.provision <verb> ...`` (see that module).
Only non-secret values go on the command line (app, org, API URL, names of secrets to
unset); secret values travel in the environment (the Fly token) or on stdin (the app's
secrets as ``NAME=VALUE`` lines), never in a string Pulumi shows in a diff or a log.
The tests execute exactly what these functions return against the Fly emulator.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MACHINE_ROLE",
    "MANAGED_SECRETS",
    "PYTHON",
    "TOKEN_ENV",
    "ProvisionCommands",
    "app_commands",
    "encode_pem",
    "machine_commands",
    "parse_stdout",
    "render_machine_spec",
    "render_secrets_stdin",
    "secrets_commands",
]

# The interpreter of Pulumi.yaml's `virtualenv: .venv`, relative to the project directory,
# which is where `pulumi up` (and pulumi/actions' work-dir) runs the commands. A relative
# path keeps machine-specific paths out of the state and out of every diff.
PYTHON: Final = ".venv/bin/python"
# The Fly token the provisioning CLI uses; flyctl reads the same variable.
TOKEN_ENV: Final = "FLY_API_TOKEN"
# The renewer's secrets that Pulumi owns (DESIGN.md "Secrets come only from the environment").
MANAGED_SECRETS: Final = (
    "CLOUDFLARE_API_TOKEN",
    "FLY_API_TOKEN",
    "MAILPACE_TOKEN",
    "ACME_ACCOUNT_KEY",
    "RFC2136_TSIG_SECRET",
)
# Metadata that marks the one scheduled machine this program owns in the renewer's app.
MACHINE_ROLE: Final = ("cert_renewer_role", "scheduled-job")
SECRETS_VERSION_KEY: Final = "cert_renewer_secrets_version"

_SECRET_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")


@dataclass(frozen=True)
class ProvisionCommands:
    """The create/update/delete strings of one ``local.Command`` (``sh -c`` strings)."""

    create: str
    update: str
    delete: str | None


def _provision(verb: str, app: str, api_base_url: str, *extra: str) -> str:
    argv = [PYTHON, "-m", "renewer.provision", verb, "--app", app, "--api-base-url", api_base_url]
    return shlex.join([*argv, *extra])


def app_commands(app: str, org: str, api_base_url: str) -> ProvisionCommands:
    """Create the renewer's app if missing; destroy removes the app and its machines."""
    ensure = _provision("ensure-app", app, api_base_url, "--org", org)
    return ProvisionCommands(ensure, ensure, _provision("destroy", app, api_base_url))


def secrets_commands(app: str, api_base_url: str, unset: Sequence[str]) -> ProvisionCommands:
    """Set the app's secrets from stdin in one API call; names in ``unset`` are removed.

    No delete: the secrets go with the app when it is destroyed.
    """
    extra = [arg for name in sorted(unset) for arg in ("--unset", name)]
    command = _provision("set-secrets", app, api_base_url, *extra)
    return ProvisionCommands(command, command, None)


def machine_commands(app: str, api_base_url: str) -> ProvisionCommands:
    """Create or update in place the scheduled machine from the JSON spec on stdin."""
    ensure = _provision("ensure-machine", app, api_base_url)
    return ProvisionCommands(ensure, ensure, _provision("destroy-machine", app, api_base_url))


def encode_pem(value: str) -> str:
    """base64 of a PEM, as the renewer accepts for ACME_ACCOUNT_KEY; a one-line value."""
    if "\n" not in value.strip():
        return value.strip()
    return base64.b64encode(value.encode()).decode("ascii")


def render_secrets_stdin(values: Mapping[str, str]) -> str:
    """``NAME=VALUE`` lines, the format of ``fly secrets import`` (fly-api.md 7)."""
    lines = []
    for name in sorted(values):
        value = values[name]
        if not _SECRET_NAME.match(name):
            raise ValueError(f"secret name {name!r}: expected upper-case letters, digits, _")
        if "\n" in value or "\r" in value:
            # Never echo the value: it is a secret.
            raise ValueError(f"secret {name}: the value must be one line (base64-encode PEMs)")
        lines.append(f"{name}={value}\n")
    return "".join(lines)


def render_machine_spec(
    *,
    image: str,
    region: str,
    schedule: str,
    renewer_config: str,
    memory_mb: int,
    secrets_version: int | None,
) -> str:
    """The JSON spec that ``ensure-machine`` reads on stdin; deterministic for stable diffs.

    fly-api.md 3.6: restart policy "no" runs the job exactly once per tick ("on-failure",
    the default for scheduled machines, would retry a failed renewal up to ten times, and
    "always" would loop). Secrets reach a machine only when it is created or updated with
    ``min_secrets_version`` (fly-api.md 4.2), so the version is part of the spec, and of
    the metadata, so that new secrets alone update the machine.
    """
    metadata = {MACHINE_ROLE[0]: MACHINE_ROLE[1]}
    if secrets_version is not None:
        metadata[SECRETS_VERSION_KEY] = str(secrets_version)
    spec = {
        "region": region,
        "min_secrets_version": secrets_version,
        "config": {
            "image": image,
            "schedule": schedule,
            "restart": {"policy": "no"},
            "auto_destroy": False,
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": memory_mb},
            "env": {"RENEWER_CONFIG": renewer_config},
            "metadata": metadata,
        },
    }
    return json.dumps(spec, sort_keys=True, indent=2) + "\n"


def parse_stdout(stdout: str) -> dict[str, object]:
    """The JSON object the provisioning CLI prints last; ``{}`` when there is none
    (e.g. under ``pulumi preview``, where commands do not run)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}
