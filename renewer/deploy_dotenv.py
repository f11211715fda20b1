"""The dotenv target: a ``KEY=base64`` file that a local SMTP server reads at start.

The file keeps every other line it holds; exactly the two variables are replaced or
appended, unquoted, as the original ``fly secrets import`` file was. It is written
atomically (temp file + rename in the same folder) with mode 0600, never through a
symlink, then the optional reload command runs (an argument list, no shell).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

from renewer.config import DotenvTargetConfig
from renewer.errors import DeployError
from renewer.targets import DeployMaterial, TargetResult

log = logging.getLogger(__name__)

_RELOAD_TIMEOUT = 120.0


def read_dotenv_values(path: Path) -> dict[str, str]:
    """Parses ``KEY=value`` lines (no quoting rules: we write values unquoted)."""
    values: dict[str, str] = {}
    for line in _read_lines(path):
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[key.strip()] = value.strip()
    return values


def render_dotenv(lines: list[str], updates: dict[str, str]) -> str:
    """Replaces the ``KEY=`` lines named in ``updates`` and appends the missing ones."""
    pending = dict(updates)
    out: list[str] = []
    for line in lines:
        key, sep, _ = line.partition("=")
        name = key.strip()
        if sep and name in updates:
            if name in pending:
                out.append(f"{name}={pending.pop(name)}")
            # A second line for the same key would shadow ours in some parsers: drop it.
            continue
        out.append(line)
    out.extend(f"{name}={value}" for name, value in pending.items())
    return "\n".join(out) + "\n"


def _read_lines(path: Path) -> list[str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DeployError(
            f"dotenv {path}: cannot read ({exc.strerror}); is it a symlink?"
        ) from None
    with os.fdopen(fd, encoding="utf-8") as handle:
        return handle.read().splitlines()


class DotenvTarget:
    """Writes the certificate into a dotenv file and runs the reload command."""

    type = "dotenv"

    def __init__(self, config: DotenvTargetConfig, base_dir: Path) -> None:
        self.config = config
        self.path = base_dir / config.path

    @property
    def name(self) -> str:
        return str(self.config.path)

    def rollout_problem(self) -> str | None:
        """A file is written whole: it cannot be half-deployed."""
        return None

    def deploy(self, material: DeployMaterial) -> TargetResult:
        updates = {
            self.config.key_var: material.key_b64.reveal(),
            self.config.chain_var: material.chain_b64,
        }
        lines = _read_lines(self.path)
        current = read_dotenv_values(self.path)
        if all(current.get(k) == v for k, v in updates.items()):
            return TargetResult(self.type, self.name, "skipped", "already holds this certificate")
        self._write_atomically(render_dotenv(lines, updates))
        log.info("dotenv %s: wrote %s and %s (mode 0600)", self.name, *updates.keys())
        detail = f"wrote {self.config.key_var} and {self.config.chain_var}"
        if self.config.reload_command:
            self._reload()
            detail += f", ran {self.config.reload_command[0]}"
        return TargetResult(self.type, self.name, "deployed", detail)

    def _write_atomically(self, text: str) -> None:
        folder = self.path.parent
        if self.path.is_symlink():
            raise DeployError(f"dotenv {self.name}: is a symlink; refusing to write through it")
        tmp = folder / f".{self.path.name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise DeployError(f"dotenv {self.name}: cannot write ({exc.strerror})") from None

    def _reload(self) -> None:
        command = list(self.config.reload_command or ())
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=_RELOAD_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise DeployError(
                f"dotenv {self.name}: reload command {command[0]!r} not found"
            ) from None
        except subprocess.TimeoutExpired:
            raise DeployError(
                f"dotenv {self.name}: reload command {command[0]!r} ran over {_RELOAD_TIMEOUT:.0f}s"
            ) from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DeployError(
                f"dotenv {self.name}: reload command {command[0]!r} exited "
                f"{done.returncode}: {tail[0][:200]}"
            )
        log.info("dotenv %s: reload command %s succeeded", self.name, command[0])
