"""The image, without a Docker engine (TESTING.md): its entry command run from exactly
what .dockerignore lets into the build context, with only the locked dependencies."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.infra.conftest import REPO


def _instruction(name: str) -> list[str]:
    lines = [
        line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith(name)
    ]
    assert len(lines) == 1, f"exactly one {name}"
    value = json.loads(lines[0][len(name) :].strip())  # exec form is a JSON array
    assert isinstance(value, list)
    return [str(v) for v in value]


def _allowed(rel: str) -> bool:
    """.dockerignore semantics for our file: later patterns win, `!` re-includes."""
    included = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        pattern = pattern.removeprefix("**/")
        hit = (
            fnmatch.fnmatch(rel, pattern)
            or rel.startswith(pattern + "/")
            or any(fnmatch.fnmatch(part, pattern) for part in rel.split("/"))
        )
        if hit:
            included = negate
    return included


def test_entrypoint_is_exec_form_python_m_renewer_run() -> None:
    assert _instruction("ENTRYPOINT") == ["python", "-m", "renewer"]
    assert _instruction("CMD") == ["run"]
    text = (REPO / "Dockerfile").read_text()
    assert "USER 10001" in text and "PYTHONUNBUFFERED=1" in text
    assert "ARG " not in text, "no build arguments: secrets never go into the image"


def test_build_context_holds_only_the_job() -> None:
    assert _allowed("renewer/run.py")
    assert _allowed("requirements.lock")
    for kept_out in (
        "tests/infra/test_image.py",
        "infra/renewer_app.py",
        "emulators/fly_api.py",
        "Pulumi.prod.yaml",
        "__main__.py",
        ".git/config",
        ".venv/bin/python",
        "renewer/__pycache__/run.cpython-311.pyc",
    ):
        assert not _allowed(kept_out), kept_out


def test_entry_command_runs_from_the_image_contents_alone(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    for path in REPO.joinpath("renewer").rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if path.is_file() and _allowed(rel):
            dest = app / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
    # -S: no site processing, so the repository's editable install cannot leak in; the
    # locked dependencies come from site-packages, our code only from the copy.
    site = sysconfig.get_paths()["purelib"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{app}{os.pathsep}{site}"}
    entry = _instruction("ENTRYPOINT")[1:]  # ["-m", "renewer"]
    help_run = subprocess.run(
        [sys.executable, "-S", *entry, "--help"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "run" in help_run.stdout
    # The default command without a config is a configuration error (exit 2): the entry
    # command starts and answers from the image contents alone.
    run = subprocess.run(
        [sys.executable, "-S", *entry, *_instruction("CMD")],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    assert "RENEWER_CONFIG" in run.stderr
    assert "Traceback" not in run.stderr
    # The whole pipeline imports from the image contents (nothing from tests/emulators).
    pipeline = subprocess.run(
        [sys.executable, "-S", "-c", "import renewer.run, renewer.cli"],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert pipeline.returncode == 0, pipeline.stderr
    # Negative control: the emulators are not in the image.
    probe = subprocess.run(
        [sys.executable, "-S", "-c", "import emulators"],
        cwd=app,
        env=env,
        capture_output=True,
        check=False,
    )
    assert probe.returncode != 0
