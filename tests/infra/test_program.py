"""The real Pulumi program (``__main__.py``) with ``Pulumi.prod.yaml``, under mocks."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from infra.config import StackConfigError
from tests.infra.conftest import (
    API_TOKEN,
    COMMAND,
    FAKE_SECRETS,
    PERMISSION_GROUPS,
    REPO,
    SCOPED_CF_TOKEN,
    ZONE_ID,
    RecordingMocks,
    commands_of,
    plain_text,
    secret_values,
    unwrap,
)

Program = Callable[..., RecordingMocks]
ALL_SECRETS = [*FAKE_SECRETS.values(), SCOPED_CF_TOKEN, "ACME-SECRET-key-material"]


def _machine_spec(mocks: RecordingMocks) -> dict[str, object]:
    machine = commands_of(mocks)["renewer-machine"]
    stdin = machine.raw["stdin"]
    assert isinstance(stdin, str), "the machine spec must stay readable in previews"
    spec: dict[str, object] = json.loads(stdin)
    return spec


def _groups_by_id() -> dict[str, str]:
    return {g["id"]: g["name"] for g in PERMISSION_GROUPS}


def test_token_is_scoped_to_the_zone_with_only_zone_read_and_dns_write(program: Program) -> None:
    mocks = program()
    tokens = [r for r in mocks.registrations if r.typ == API_TOKEN]
    assert len(tokens) == 1
    policies = tokens[0].inputs["policies"]
    assert len(policies) == 1, "one allow policy, nothing else"
    policy = policies[0]
    assert policy["effect"] == "allow"
    names = sorted(_groups_by_id()[g["id"]] for g in policy["permissionGroups"])
    assert names == ["DNS Write", "Zone Read"]
    # Negative control: the other groups the lookup returned were not taken.
    assert {"DNS Read", "Zone Write", "Zone Settings Write"}.isdisjoint(names)
    resources = json.loads(policy["resources"])
    assert resources == {f"com.cloudflare.api.account.zone.{ZONE_ID}": "*"}
    assert not any(
        k.startswith("com.cloudflare.api.account.") and "zone" not in k for k in resources
    )
    # The permission groups were looked up (by name), the zone by its name.
    tokens_called = [t for t, _ in mocks.calls]
    assert "cloudflare:index/getZone:getZone" in tokens_called
    assert any(t.endswith("getApiTokenPermissionGroupsList") for t in tokens_called)


def test_configured_zone_id_skips_the_lookup_and_scopes_to_that_zone(program: Program) -> None:
    config = json.loads(json.dumps(_prod_renewer()))
    config["dns"]["zone_ids"] = {"example.com": "abc123"}
    mocks = program(renewer=config)
    assert not [t for t, _ in mocks.calls if t.endswith("getZone")]
    policy = next(r for r in mocks.registrations if r.typ == API_TOKEN).inputs["policies"][0]
    assert json.loads(policy["resources"]) == {"com.cloudflare.api.account.zone.abc123": "*"}


def test_machine_is_weekly_with_restart_no_in_the_region(program: Program) -> None:
    spec = _machine_spec(program())
    config = spec["config"]
    assert isinstance(config, dict)
    assert config["schedule"] == "weekly"
    assert config["restart"] == {"policy": "no"}
    assert spec["region"] == "cdg"
    assert config["metadata"]["cert_renewer_role"] == "scheduled-job"
    assert spec["min_secrets_version"] == 7  # from the secrets command's output
    renewer = json.loads(config["env"]["RENEWER_CONFIG"])
    expected = _prod_renewer()
    expected["dns"]["zone_ids"] = {"example.com": ZONE_ID}
    assert renewer == expected


def test_machine_waits_for_app_secrets_and_image(program: Program) -> None:
    commands = commands_of(program())
    waits_for = {urn.rsplit("::", 1)[-1] for urn in commands["renewer-machine"].dependencies}
    assert {"renewer-app", "renewer-secrets", "renewer-image"} <= waits_for
    assert "renewer-machine" not in {
        urn.rsplit("::", 1)[-1] for urn in commands["renewer-app"].dependencies
    }


def test_schedule_comes_from_config(program: Program) -> None:
    spec = _machine_spec(program(schedule="daily"))
    assert spec["config"]["schedule"] == "daily"  # type: ignore[index]


def test_every_secret_input_is_secret_and_no_secret_is_in_plain_sight(program: Program) -> None:
    mocks = program()
    commands = commands_of(mocks)
    assert set(commands) == {"renewer-app", "renewer-secrets", "renewer-image", "renewer-machine"}
    for name, command in commands.items():
        # The Fly token travels in the environment, as a secret.
        assert list(secret_values(command.raw["environment"])) == [
            {"FLY_API_TOKEN": FAKE_SECRETS["cert-renewer:flyProvisionToken"]}
        ] or list(secret_values(command.raw["environment"]["FLY_API_TOKEN"])) == [
            FAKE_SECRETS["cert-renewer:flyProvisionToken"]
        ], name
        assert command.inputs["logging"] == "none", name
        assert {"stdout", "stderr"} <= set(command.secret_outputs), name
        assert command.inputs.get("addPreviousOutputInEnv") is False, name
        visible = plain_text(command.raw)
        for secret in ALL_SECRETS:
            assert secret not in visible, f"{name} shows a secret outside a secret value"
    # The secrets stdin is one secret value that carries every secret, the scoped
    # Cloudflare token included (and the provider's own token not).
    [stdin] = list(secret_values(commands["renewer-secrets"].raw["stdin"]))
    assert isinstance(stdin, str)
    lines = dict(line.split("=", 1) for line in stdin.splitlines())
    assert lines["CLOUDFLARE_API_TOKEN"] == SCOPED_CF_TOKEN
    assert lines["FLY_API_TOKEN"] == FAKE_SECRETS["cert-renewer:flyApiToken"]
    assert lines["MAILPACE_TOKEN"] == FAKE_SECRETS["cert-renewer:mailpaceToken"]
    assert "ACME-SECRET" not in lines["ACME_ACCOUNT_KEY"]  # base64 of the PEM: one line
    assert FAKE_SECRETS["cloudflare:apiToken"] not in stdin
    # The scoped token appears nowhere else.
    for registration in mocks.registrations:
        if registration.name != "renewer-secrets":
            assert SCOPED_CF_TOKEN not in json.dumps(registration.raw), registration.name


def test_provision_token_defaults_to_the_target_token(program: Program) -> None:
    mocks = program(flyProvisionToken=None)
    env = unwrap(commands_of(mocks)["renewer-app"].raw["environment"])
    assert env == {"FLY_API_TOKEN": FAKE_SECRETS["cert-renewer:flyApiToken"]}


def test_stack_outputs_an_operator_needs(program: Program) -> None:
    outputs = program().stack_outputs
    assert outputs["appName"] == ["example-cert-renewer", False]
    assert outputs["schedule"] == ["weekly", False]
    assert outputs["machineId"][0] == "148ed599c12345"
    assert outputs["image"][0].startswith("registry.fly.io/example-cert-renewer:src-")
    assert outputs["cloudflareTokenId"][0] == "dns-token-id"
    for name, (value, _secret) in outputs.items():
        assert all(s not in str(value) for s in ALL_SECRETS), name


def test_prebuilt_image_skips_the_build(program: Program) -> None:
    mocks = program(image="registry.fly.io/shared:v1")
    assert "renewer-image" not in commands_of(mocks)
    assert _machine_spec(mocks)["config"]["image"] == "registry.fly.io/shared:v1"  # type: ignore[index]


def test_caa_records_only_when_asked(program: Program) -> None:
    assert not [r for r in program().registrations if r.typ.endswith("dnsRecord:DnsRecord")]


def test_caa_records_allow_only_the_configured_ca(program: Program) -> None:
    mocks = program(caaIssuer="letsencrypt.org")
    records = [r for r in mocks.registrations if r.typ.endswith("dnsRecord:DnsRecord")]
    assert sorted(r.inputs["name"] for r in records) == [
        "mail.example.com",
        "mx.example.com",
        "smtp.example.com",
    ]
    for record in records:
        assert record.inputs["type"] == "CAA"
        assert record.inputs["zoneId"] == ZONE_ID
        assert record.inputs["data"]["tag"] == "issue"
        assert record.inputs["data"]["value"] == "letsencrypt.org"


def _copy_project(dest: Path) -> Path:
    shutil.copy(REPO / "__main__.py", dest / "__main__.py")
    for name in ("Dockerfile", ".dockerignore", "requirements.lock"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, dest / name)
    shutil.copytree(
        REPO / "renewer", dest / "renewer", ignore=shutil.ignore_patterns("__pycache__")
    )
    (dest / "tests").mkdir()
    (dest / "tests" / "test_x.py").write_text("x = 1\n")
    return dest


def _image_label(mocks: RecordingMocks) -> str:
    triggers = commands_of(mocks)["renewer-image"].inputs["triggers"]
    label = triggers[1]
    assert isinstance(label, str)
    mocks.registrations.clear()
    return label


def test_image_label_follows_the_renewer_sources_only(program: Program, tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    first = _image_label(program(root))
    assert _image_label(program(root)) == first, "same tree, same label"
    (root / "tests" / "test_x.py").write_text("x = 2\n")
    (root / "README.md").write_text("docs change\n")
    assert _image_label(program(root)) == first, "tests and docs are not in the image"
    with (root / "renewer" / "__init__.py").open("a") as f:
        f.write("\n# a change to the job\n")
    second = _image_label(program(root))
    assert second != first
    (root / "Dockerfile").write_text((root / "Dockerfile").read_text() + "\n# changed\n")
    assert _image_label(program(root)) not in (first, second)


def _prod_renewer() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "Pulumi.prod.yaml").read_text())["config"]
    renewer: dict[str, Any] = data["cert-renewer:renewer"]
    return renewer


def _with_domains(domains: list[str]) -> dict[str, object]:
    renewer = _prod_renewer()
    renewer["certificates"][0]["domains"] = domains
    return renewer


def _with_target(app: str) -> dict[str, object]:
    renewer = _prod_renewer()
    renewer["certificates"][1]["targets"][0]["app"] = app
    return renewer


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"region": "paris"}, "cert-renewer:region", "three letters"),
        ({"region": "CDG"}, "cert-renewer:region", "three letters"),
        ({"region": None}, "cert-renewer:region", "required"),
        ({"schedule": "fortnightly"}, "cert-renewer:schedule", "hourly, daily, weekly, monthly"),
        ({"appName": "Cert_Renewer"}, "cert-renewer:appName", "lowercase"),
        (
            {"renewer": _with_domains([])},
            "cert-renewer:renewer.certificates[0].domains",
            "non-empty",
        ),
        (
            {"renewer": _with_target("example-cert-renewer")},
            "cert-renewer:renewer.certificates[1].targets[0].app",
            "renewer's own app",
        ),
        ({"renewer": None}, "cert-renewer:renewer", "required"),
        ({"flyApiToken": None}, "cert-renewer:flyApiToken", "pulumi config set --secret"),
        ({"mailpaceToken": None}, "cert-renewer:mailpaceToken", "notify"),
        ({"machineMemoryMb": "300"}, "cert-renewer:machineMemoryMb", "multiple of 256"),
    ],
)
def test_invalid_stack_config_fails_before_any_resource(
    program: Program, mocks: RecordingMocks, overrides: dict[str, object], key: str, words: str
) -> None:
    with pytest.raises(StackConfigError) as caught:
        program(**overrides)
    assert caught.value.key == key
    assert words in str(caught.value)
    assert str(caught.value).startswith(key + ": ")
    assert mocks.registrations == [], "nothing may be declared before the config is valid"
    assert mocks.calls == []


def test_renewal_config_is_checked_by_the_renewers_parser(
    program: Program, mocks: RecordingMocks
) -> None:
    renewer = _prod_renewer()
    renewer["renewal"] = {"before_days": 30, "typo_key": 1}
    with pytest.raises(StackConfigError) as caught:
        program(renewer=renewer)
    assert caught.value.key == "cert-renewer:renewer"
    assert "typo_key" in str(caught.value)
    assert mocks.registrations == []


def test_valid_config_declares_resources(program: Program) -> None:
    # Positive control for the test above: the same program with prod config declares all.
    mocks = program()
    assert {r.typ for r in mocks.registrations} >= {API_TOKEN, COMMAND}


KEY_PEM = "\x2d----BEGIN PRIVATE KEY-----\nDANE-SECRET-key-material\n-----END PRIVATE KEY-----\n"


def test_key_env_key_reaches_the_renewer_as_a_secret_of_that_name(program: Program) -> None:
    renewer = _prod_renewer()
    renewer["certificates"][0]["key_env"] = "SUBMISSION_TLS_KEY"

    mocks = program(renewer=renewer, SUBMISSION_TLS_KEY=KEY_PEM)

    commands = commands_of(mocks)
    [stdin] = list(secret_values(commands["renewer-secrets"].raw["stdin"]))
    assert isinstance(stdin, str)
    lines = dict(line.split("=", 1) for line in stdin.splitlines())
    assert base64.b64decode(lines["SUBMISSION_TLS_KEY"]).decode() == KEY_PEM
    for registration in mocks.registrations:
        assert "DANE-SECRET" not in plain_text(registration.raw), registration.name


def test_key_env_without_its_secret_fails_before_any_resource(
    program: Program, mocks: RecordingMocks
) -> None:
    renewer = _prod_renewer()
    renewer["certificates"][0]["key_env"] = "SUBMISSION_TLS_KEY"
    with pytest.raises(StackConfigError) as caught:
        program(renewer=renewer)
    assert caught.value.key == "cert-renewer:SUBMISSION_TLS_KEY"
    assert "pulumi config set --secret SUBMISSION_TLS_KEY" in str(caught.value)
    assert mocks.registrations == []
