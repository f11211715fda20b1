"""Pure renderers (infra.commands, infra.flyctl), the provisioning CLI's input parsing,
and the import boundary between the job and the Pulumi side."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra import commands, flyctl
from renewer import provision
from renewer.errors import ConfigError
from tests.infra.conftest import REPO


def test_secrets_stdin_is_sorted_name_value_lines() -> None:
    text = commands.render_secrets_stdin({"B_TOKEN": "b", "A_TOKEN": "a=b"})
    assert text == "A_TOKEN=a=b\nB_TOKEN=b\n"
    parsed = provision.parse_secret_lines(text)
    assert {k: v.reveal() for k, v in parsed.items()} == {"A_TOKEN": "a=b", "B_TOKEN": "b"}


def test_secrets_stdin_refuses_multiline_values_without_echoing_them() -> None:
    with pytest.raises(ValueError, match="ACME_ACCOUNT_KEY") as caught:
        commands.render_secrets_stdin({"ACME_ACCOUNT_KEY": "line1-SECRET\nline2-SECRET"})
    assert "SECRET" not in str(caught.value)
    with pytest.raises(ValueError, match="secret name"):
        commands.render_secrets_stdin({"lower": "x"})


def test_pem_is_sent_as_one_base64_line() -> None:
    pem = "-----BEGIN KEY-----\nabc\n-----END KEY-----\n"
    encoded = commands.encode_pem(pem)
    assert "\n" not in encoded
    assert base64.b64decode(encoded).decode() == pem
    assert commands.encode_pem("already-one-line") == "already-one-line"


def test_secret_lines_parser_names_the_line_never_the_value() -> None:
    with pytest.raises(ConfigError) as caught:
        provision.parse_secret_lines("GOOD=1\nnot a pair SECRET-VALUE\n")
    assert "stdin line 2" in str(caught.value)
    assert "SECRET-VALUE" not in str(caught.value)
    with pytest.raises(ConfigError, match="twice"):
        provision.parse_secret_lines("A=1\nA=2\n")
    assert provision.parse_secret_lines("# comment\n\nA=1\n").keys() == {"A"}


def test_machine_spec_round_trip_and_validation() -> None:
    text = commands.render_machine_spec(
        image="img:1",
        region="cdg",
        schedule="weekly",
        renewer_config="{}",
        memory_mb=256,
        secrets_version=3,
    )
    region, config, version = provision.parse_machine_spec(text)
    assert (region, version) == ("cdg", 3)
    assert config["restart"] == {"policy": "no"}
    assert config["metadata"] == {
        "cert_renewer_role": "scheduled-job",
        "cert_renewer_secrets_version": "3",
    }
    broken = json.loads(text)
    del broken["config"]["metadata"]
    with pytest.raises(ConfigError, match="metadata"):
        provision.parse_machine_spec(json.dumps(broken))
    with pytest.raises(ConfigError, match="region"):
        provision.parse_machine_spec(json.dumps({**json.loads(text), "region": "paris"}))


def test_both_sides_agree_on_the_machine_marker() -> None:
    # Neither package may import the other, so the constant is duplicated: keep it equal.
    assert commands.MACHINE_ROLE == provision.MACHINE_ROLE
    assert commands.TOKEN_ENV == provision.TOKEN_ENV


def test_contains_ignores_api_defaults_but_sees_changes() -> None:
    desired = {"restart": {"policy": "no"}, "image": "a"}
    assert provision._contains(
        {"restart": {"policy": "no", "max_retries": 0}, "image": "a"}, desired
    )
    assert not provision._contains({"restart": {"policy": "always"}, "image": "a"}, desired)
    assert not provision._contains({"image": "a"}, desired)


def test_parse_stdout_takes_the_last_json_object() -> None:
    assert commands.parse_stdout('noise\n{"version": 3}\n') == {"version": 3}
    assert commands.parse_stdout("") == {}


def test_cli_without_token_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FLY_API_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "renewer.provision", "destroy", "--app", "x"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "FLY_API_TOKEN" in proc.stderr
    assert proc.stdout == ""


FAKE_FLYCTL = """#!{python}
import json, os, sys
args = sys.argv[1:]
config = args[args.index("--config") + 1]
record = {{
    "argv": args,
    "fly_toml": open(config).read(),
    "config_dir": os.path.dirname(config),
    "token_set": bool(os.environ.get("FLY_API_TOKEN")),
    "cwd": os.getcwd(),
}}
open(os.environ["FAKE_FLYCTL_RECORD"], "w").write(json.dumps(record))
label = args[args.index("--image-label") + 1]
sys.stderr.write("==> Building image\\nimage: registry.fly.io/app:" + label + "\\n")
"""


def test_build_command_runs_flyctl_remote_build_with_a_minimal_fly_toml(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flyctl"
    fake.write_text(FAKE_FLYCTL.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.json"
    script = flyctl.build_command("example-cert-renewer", "src-0123456789abcdef")
    proc = subprocess.run(
        ["/bin/sh", "-c", script],
        cwd=REPO,
        env={
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FLY_API_TOKEN": "fm2_SECRET",
            "FAKE_FLYCTL_RECORD": str(record),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(record.read_text())
    argv = seen["argv"]
    assert argv[:2] == ["deploy", "--build-only"]
    assert {"--push", "--remote-only"} <= set(argv)
    assert argv[argv.index("--image-label") + 1] == "src-0123456789abcdef"
    assert argv[argv.index("--app") + 1] == "example-cert-renewer"
    assert argv[-1] == "."
    assert seen["fly_toml"] == 'app = "example-cert-renewer"\n'
    assert seen["token_set"] is True
    assert "fm2_SECRET" not in script
    assert not Path(seen["config_dir"]).exists(), "the throwaway fly.toml is removed"
    assert flyctl.image_ref("a", "l") == "registry.fly.io/a:l"


def test_build_command_fails_when_flyctl_fails(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "flyctl"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    proc = subprocess.run(
        ["/bin/sh", "-c", flyctl.build_command("a", "l")],
        cwd=REPO,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 3


def _modules_after(code: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(proc.stdout.split())


def test_the_job_never_loads_pulumi() -> None:
    loaded = _modules_after("import renewer, renewer.config, renewer.provision, renewer.fly")
    assert "renewer.provision" in loaded  # positive control
    assert not {m for m in loaded if m == "pulumi" or m.startswith("pulumi")}


def test_infra_never_imports_the_job() -> None:
    loaded = _modules_after(
        "import infra.config, infra.commands, infra.flyctl, infra.dns_token, infra.renewer_app"
    )
    assert "pulumi" in loaded  # positive control
    assert not {m for m in loaded if m == "renewer" or m.startswith("renewer.")}
    for source in (REPO / "infra").glob("*.py"):
        text = source.read_text()
        assert "import renewer" not in text and "from renewer" not in text, source.name
