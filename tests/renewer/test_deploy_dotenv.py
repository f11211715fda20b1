"""renewer.deploy_dotenv: the ``KEY=base64`` file a local SMTP server reads.

DESIGN.md: the file keeps any other lines it holds and replaces or appends exactly the
two ``KEY=value`` lines, unquoted; written atomically with mode 0600, never through a
symlink; then the optional reload command runs (an argument list, no shell).
"""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from renewer.config import DotenvTargetConfig
from renewer.deploy_dotenv import DotenvTarget, read_dotenv_values, render_dotenv
from renewer.errors import DeployError
from renewer.sensitive import Secret
from renewer.targets import DeployMaterial

KEY_B64 = base64.b64encode(b"\x2d----BEGIN PRIVATE KEY-----\nsecret-key-bytes\n").decode()
CHAIN_B64 = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nchain\n").decode()
MATERIAL = DeployMaterial(
    certificate_name="smtp",
    key_b64=Secret(KEY_B64),
    chain_b64=CHAIN_B64,
    serial="3f2a",
    fingerprint_sha256="ab" * 32,
)


def _target(
    base: Path,
    *,
    path: str = "smtp.env",
    reload_command: tuple[str, ...] | None = None,
    key_var: str = "PRIVATEKEY",
    chain_var: str = "FULLCHAIN",
) -> DotenvTarget:
    config = DotenvTargetConfig(
        path=Path(path), key_var=key_var, chain_var=chain_var, reload_command=reload_command
    )
    return DotenvTarget(config, base)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------- the file


def test_creates_the_file_with_mode_0600(tmp_path: Path) -> None:
    result = _target(tmp_path).deploy(MATERIAL)
    path = tmp_path / "smtp.env"
    assert path.read_text() == f"PRIVATEKEY={KEY_B64}\nFULLCHAIN={CHAIN_B64}\n"
    assert _mode(path) == 0o600
    assert (result.type, result.name, result.status) == ("dotenv", "smtp.env", "deployed")
    assert result.detail == "wrote PRIVATEKEY and FULLCHAIN"
    assert os.listdir(tmp_path) == ["smtp.env"]  # no temp file left behind


def test_keeps_other_lines_and_replaces_exactly_the_two(tmp_path: Path) -> None:
    path = tmp_path / "smtp.env"
    path.write_text(
        "# smtp server settings\n"
        "HOSTNAME=smtp.example.com\n"
        'PRIVATEKEY="old-quoted-key"\n'
        "\n"
        "PORT=587\n"
        "FULLCHAIN=old-chain\n"
        "FULLCHAIN=shadowing-duplicate\n"
        "PRIVATEKEY_BACKUP=keep-me\n"
        "export OTHER=1\n"
    )
    path.chmod(0o644)
    inode = path.stat().st_ino
    _target(tmp_path).deploy(MATERIAL)
    assert path.read_text().splitlines() == [
        "# smtp server settings",
        "HOSTNAME=smtp.example.com",
        f"PRIVATEKEY={KEY_B64}",
        "",
        "PORT=587",
        f"FULLCHAIN={CHAIN_B64}",
        "PRIVATEKEY_BACKUP=keep-me",
        "export OTHER=1",
    ]
    assert _mode(path) == 0o600  # tightened, even though the old file was 0644
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert os.listdir(tmp_path) == ["smtp.env"]


def test_appends_missing_variables_unquoted(tmp_path: Path) -> None:
    path = tmp_path / "smtp.env"
    path.write_text("HOSTNAME=smtp.example.com")  # no final newline
    _target(tmp_path, key_var="TLS_KEY", chain_var="TLS_CHAIN").deploy(MATERIAL)
    text = path.read_text()
    assert text == f"HOSTNAME=smtp.example.com\nTLS_KEY={KEY_B64}\nTLS_CHAIN={CHAIN_B64}\n"
    assert '"' not in text and "'" not in text
    assert read_dotenv_values(path) == {
        "HOSTNAME": "smtp.example.com",
        "TLS_KEY": KEY_B64,
        "TLS_CHAIN": CHAIN_B64,
    }


@pytest.mark.integration
def test_identical_content_is_skipped_without_reload(tmp_path: Path) -> None:
    marker = tmp_path / "reloaded"
    target = _target(tmp_path, reload_command=("touch", str(marker)))
    assert target.deploy(MATERIAL).status == "deployed"
    assert marker.exists()  # negative control: the first deploy did reload
    marker.unlink()
    path = tmp_path / "smtp.env"
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    result = target.deploy(MATERIAL)
    assert result.status == "skipped"
    assert result.detail == "already holds this certificate"
    assert not marker.exists()
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime)


def test_a_changed_value_is_not_skipped(tmp_path: Path) -> None:
    _target(tmp_path).deploy(MATERIAL)
    other = DeployMaterial("smtp", Secret(KEY_B64), CHAIN_B64 + "x", "3f2b", "cd" * 32)
    assert _target(tmp_path).deploy(other).status == "deployed"
    assert read_dotenv_values(tmp_path / "smtp.env")["FULLCHAIN"] == CHAIN_B64 + "x"


def test_refuses_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    (tmp_path / "smtp.env").symlink_to(victim)
    with pytest.raises(DeployError, match="symlink") as caught:
        _target(tmp_path).deploy(MATERIAL)
    assert victim.read_text() == "do not touch\n"
    assert (tmp_path / "smtp.env").is_symlink()
    assert KEY_B64 not in str(caught.value)
    assert sorted(os.listdir(tmp_path)) == ["smtp.env", "victim.txt"]


def test_missing_folder_is_a_deploy_error(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="cannot write") as caught:
        _target(tmp_path, path="gone/smtp.env").deploy(MATERIAL)
    assert caught.value.step == "deploy"
    assert KEY_B64 not in str(caught.value)


# --------------------------------------------------------------------- reload


@pytest.mark.integration
def test_reload_command_runs_after_the_write(tmp_path: Path) -> None:
    copy = tmp_path / "seen-by-reload.env"
    # The reload sees the new file: it copies it (argument list, no shell in the product).
    result = _target(tmp_path, reload_command=("cp", str(tmp_path / "smtp.env"), str(copy))).deploy(
        MATERIAL
    )
    assert result.status == "deployed"
    assert result.detail == "wrote PRIVATEKEY and FULLCHAIN, ran cp"
    assert copy.read_text() == (tmp_path / "smtp.env").read_text()


@pytest.mark.integration
def test_failing_reload_names_the_exit_code(tmp_path: Path) -> None:
    command = ("sh", "-c", "echo 'smtp: reload refused' >&2; exit 3")
    with pytest.raises(DeployError) as caught:
        _target(tmp_path, reload_command=command).deploy(MATERIAL)
    message = str(caught.value)
    assert "reload command 'sh' exited 3" in message
    assert "smtp: reload refused" in message
    assert KEY_B64 not in message
    # The file was written before the reload failed; the next run skips the write and the
    # operator sees the failure.
    assert read_dotenv_values(tmp_path / "smtp.env")["PRIVATEKEY"] == KEY_B64


def test_missing_reload_command_is_a_deploy_error(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="'no-such-reload-tool' not found"):
        _target(tmp_path, reload_command=("no-such-reload-tool", "--now")).deploy(MATERIAL)


@pytest.mark.integration
def test_reload_arguments_are_not_interpreted_by_a_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _target(tmp_path, reload_command=("echo", f"; touch {marker}", f"$(touch {marker})")).deploy(
        MATERIAL
    )
    assert not marker.exists()


# --------------------------------------------------------------------- pure helpers


def test_render_dotenv() -> None:
    lines = ["A=1", " PRIVATEKEY = old", "# PRIVATEKEY=commented", "PRIVATEKEY=dup", "B"]
    assert render_dotenv(lines, {"PRIVATEKEY": "new", "FULLCHAIN": "c"}) == (
        "A=1\nPRIVATEKEY=new\n# PRIVATEKEY=commented\nB\nFULLCHAIN=c\n"
    )
    assert render_dotenv([], {"K": "v"}) == "K=v\n"


def test_read_dotenv_values_ignores_comments_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.env"
    assert read_dotenv_values(path) == {}
    path.write_text("# K=commented\nK=v=with=equals\nnot a pair\n")
    assert read_dotenv_values(path) == {"K": "v=with=equals"}
