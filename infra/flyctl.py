"""The one job left to flyctl: building the image on Fly's remote builder.

fly-api.md 5: ``fly deploy --build-only --push --image-label L -a APP`` builds remotely
(``--remote-only`` is the default; no local Docker needed) and pushes
``registry.fly.io/APP:L``. We choose the label ourselves, a hash of everything that goes
into the image, so the image reference is known at preview time, a rebuild happens exactly
when an input changes, and an unchanged tree never rebuilds.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = ["IMAGE_INPUTS", "build_command", "image_inputs", "image_label", "image_ref"]

# What the Dockerfile reads (keep in step with it and with .dockerignore).
IMAGE_INPUTS: Final = ("Dockerfile", ".dockerignore", "requirements.lock")
SOURCE_DIR: Final = "renewer"
REGISTRY: Final = "registry.fly.io"


def image_inputs(root: Path) -> Iterator[Path]:
    """The files whose bytes decide the image, in a stable order (relative to ``root``)."""
    for name in IMAGE_INPUTS:
        yield Path(name)
    sources = root / SOURCE_DIR
    files = (
        p.relative_to(root)
        for p in sources.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    yield from sorted(files, key=lambda p: p.as_posix())


def image_label(root: Path) -> str:
    """``src-`` plus 16 hex digits of SHA-256 over the names and bytes of the inputs.

    A missing input (say, no lock file yet) hashes as absent rather than failing, so the
    label is still deterministic.
    """
    digest = hashlib.sha256()
    for rel in image_inputs(root):
        path = root / rel
        digest.update(rel.as_posix().encode() + b"\0")
        if path.is_file():
            data = path.read_bytes()
            digest.update(str(len(data)).encode() + b"\0" + data)
        else:
            digest.update(b"absent\0")
    return "src-" + digest.hexdigest()[:16]


def image_ref(app: str, label: str) -> str:
    return f"{REGISTRY}/{app}:{label}"


def build_command(app: str, label: str, dockerfile: str = "Dockerfile") -> str:
    """A ``sh -c`` script: a throwaway minimal fly.toml, then the remote build and push.

    fly-api.md 5: for a brand-new app with no release and no fly.toml, flyctl's behaviour
    is unconfirmed, so we hand it a minimal config naming the app; the build context is
    the project directory. The token comes from FLY_API_TOKEN in the environment.
    """
    deploy = shlex.join(
        [
            "flyctl",
            "deploy",
            "--build-only",
            "--push",
            "--remote-only",
            "--image-label",
            label,
            "--app",
            app,
            "--dockerfile",
            dockerfile,
        ]
    )
    fly_toml = shlex.quote(f'app = "{app}"\n')
    return (
        "set -eu\n"
        'cfg_dir="$(mktemp -d)"\n'
        "trap 'rm -rf \"$cfg_dir\"' EXIT\n"
        f"printf '%s' {fly_toml} > \"$cfg_dir/fly.toml\"\n"
        f'{deploy} --config "$cfg_dir/fly.toml" .\n'
    )
