"""RenewerApp: the renewer's Fly app, its secrets, its image and its scheduled machine.

Every step is a ``pulumi_command.local.Command`` running our own idempotent provisioning
CLI (``python -m renewer.provision``, built on the same Fly client the job uses), except
the image build, which only flyctl's remote builder can do (fly-api.md 5).

How changes flow (pulumi-command 1.2.1, checked in its SDK and provider source):
- ``triggers`` is replace-on-change: we put only the app name there, so renaming the app
  replaces the commands (create in the new app, delete in the old one);
- any other input change (stdin, environment, command) is an update, which runs
  ``update``; our update is the same idempotent "ensure" verb, so a new image or config
  updates the machine in place and an unchanged stack runs nothing at all;
- ``pulumi preview`` never runs a command.

Secrets: ``logging=NONE`` and ``additional_secret_outputs`` on every command (STYLE.md 1.6,
pulumi/pulumi-command#260: stdout can show in diffs even when marked secret), secret values
only in ``environment``/``stdin``, and ``add_previous_output_in_env`` off.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pulumi
from pulumi_command import local

from infra import commands, flyctl

__all__ = ["RenewerApp", "RenewerAppArgs"]


@dataclass(frozen=True)
class RenewerAppArgs:
    app_name: str
    fly_org: str
    region: str
    schedule: str
    memory_mb: int
    fly_api_base_url: str
    # The token Pulumi uses to create the app and its machine (an org token).
    provision_token: pulumi.Input[str]
    # The renewer's secrets, NAME -> secret value; names not given are unset on the app.
    secrets: Mapping[str, pulumi.Input[str]]
    # RENEWER_CONFIG: the renewal JSON (no secrets in it).
    renewer_config: pulumi.Input[str]
    # A prebuilt image, or None to build one from the Dockerfile labelled `image_label`.
    image: str | None
    image_label: str


def _command_opts(parent: pulumi.Resource, *depends: pulumi.Resource) -> pulumi.ResourceOptions:
    return pulumi.ResourceOptions(
        parent=parent,
        depends_on=list(depends),
        additional_secret_outputs=["stdout", "stderr"],
    )


def _secrets_version(stdout: str) -> int | None:
    version = commands.parse_stdout(stdout).get("version")
    return version if isinstance(version, int) else None


def _machine_field(key: str) -> Callable[[str], str]:
    def pick(stdout: str) -> str:
        return str(commands.parse_stdout(stdout).get(key, ""))

    return pick


class RenewerApp(pulumi.ComponentResource):
    """The renewer on Fly: app, secrets, image and one scheduled machine (restart "no")."""

    app_name: pulumi.Output[str]
    image: pulumi.Output[str]
    machine_id: pulumi.Output[str]
    schedule: pulumi.Output[str]

    def __init__(
        self, name: str, args: RenewerAppArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("cert-renewer:fly:RenewerApp", name, None, opts)
        token_env = {commands.TOKEN_ENV: pulumi.Output.secret(args.provision_token)}
        app_id = [args.app_name]

        app_cmd = commands.app_commands(args.app_name, args.fly_org, args.fly_api_base_url)
        app = local.Command(
            f"{name}-app",
            create=app_cmd.create,
            update=app_cmd.update,
            delete=app_cmd.delete,
            environment=token_env,
            triggers=app_id,
            logging=local.Logging.NONE,
            add_previous_output_in_env=False,
            opts=_command_opts(self),
        )

        present = sorted(args.secrets)
        absent = [n for n in commands.MANAGED_SECRETS if n not in args.secrets]
        secret_values = pulumi.Output.all(*(args.secrets[n] for n in present))
        rendered: pulumi.Output[str] = secret_values.apply(
            lambda vals: commands.render_secrets_stdin(dict(zip(present, vals, strict=True)))
        )
        stdin: pulumi.Output[str] = pulumi.Output.secret(rendered)
        secrets_cmd = commands.secrets_commands(args.app_name, args.fly_api_base_url, absent)
        secrets = local.Command(
            f"{name}-secrets",
            create=secrets_cmd.create,
            update=secrets_cmd.update,
            environment=token_env,
            stdin=stdin,
            triggers=app_id,
            logging=local.Logging.NONE,
            add_previous_output_in_env=False,
            opts=_command_opts(self, app),
        )

        machine_deps: list[pulumi.Resource] = [app, secrets]
        if args.image is not None:
            image: pulumi.Output[str] = pulumi.Output.from_input(args.image)
        else:
            ref = flyctl.image_ref(args.app_name, args.image_label)
            build = local.Command(
                f"{name}-image",
                create=flyctl.build_command(args.app_name, args.image_label),
                environment=token_env,
                # A new label is a new image: "replace" re-runs the build; nothing to delete
                # (the registry keeps old tags, which also allows a rollback).
                triggers=[args.app_name, args.image_label],
                logging=local.Logging.NONE,
                add_previous_output_in_env=False,
                opts=_command_opts(self, app),
            )
            machine_deps.append(build)
            # Known at preview time, so a PR's preview shows the new image in the machine
            # spec; depends_on still makes the machine wait for the build.
            image = pulumi.Output.from_input(ref)

        # The secrets command prints only {"app", "version"}; the version is a counter, not
        # a secret, and it must stay readable so the machine spec diff shows in previews.
        version = pulumi.Output.unsecret(secrets.stdout.apply(_secrets_version))
        spec = pulumi.Output.all(image, args.renewer_config, version).apply(
            lambda parts: commands.render_machine_spec(
                image=parts[0],
                region=args.region,
                schedule=args.schedule,
                renewer_config=parts[1],
                memory_mb=args.memory_mb,
                secrets_version=parts[2],
            )
        )
        machine_cmd = commands.machine_commands(args.app_name, args.fly_api_base_url)
        machine = local.Command(
            f"{name}-machine",
            create=machine_cmd.create,
            update=machine_cmd.update,
            delete=machine_cmd.delete,
            environment=token_env,
            stdin=spec,
            triggers=app_id,
            logging=local.Logging.NONE,
            add_previous_output_in_env=False,
            opts=_command_opts(self, *machine_deps),
        )

        self.app_name = app.id.apply(lambda _: args.app_name)
        self.image = image
        self.schedule = pulumi.Output.from_input(args.schedule)
        # ensure-machine prints only {"machine_id", "image", "action"}: no secret to keep.
        self.machine_id = pulumi.Output.unsecret(machine.stdout.apply(_machine_field("machine_id")))
        self.machine_spec = spec
        self.register_outputs(
            {
                "app_name": self.app_name,
                "image": self.image,
                "machine_id": self.machine_id,
                "schedule": self.schedule,
            }
        )
