"""A scanner for secret material in what the job prints, logs, reports and emails.

It fails on:
- any PEM private key marker (``-----BEGIN ... PRIVATE KEY-----``), also base64-encoded
  (a ``base64 -w0`` of a PEM starts with ``LS0tLS1CRUdJTi``; such runs are decoded and
  checked for ``PRIVATE KEY``);
- any known secret value, or a long enough piece of one: API tokens (Cloudflare, Fly
  with and without ``FlyV1 ``, MailPace), the TSIG secret, the ACME account key and every
  private key a run produced, as PEM body, as ``base64 -w0`` of the PEM, and as the DER
  base64. Long values are cut into overlapping windows so that a truncated excerpt
  (e.g. an error body cut at 300 characters) is caught too.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emulators.world import LocalWorld

WINDOW = 24  # characters: a leaked piece this long is never a coincidence
STEP = 8
_PEM_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_B64_PEM = re.compile(r"LS0tLS1CRUdJTi[A-Za-z0-9+/=]{20,}")
_APPS = ("demo-submission", "demo-inbound")


@dataclass
class Needles:
    """Secret values to look for: ``(label, value)``; labels never hold the value."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, value: str | None) -> None:
        if value and len(value.strip()) >= 8:
            self.items.append((label, value.strip()))

    def add_key_material(self, label: str, pem_or_b64: str | None) -> None:
        """A private key given as PEM or as base64 of PEM: adds the PEM, its base64, its
        body (the DER base64) and every body line."""
        if not pem_or_b64:
            return
        text = pem_or_b64.strip()
        if not text.startswith("-----BEGIN"):
            try:
                decoded = base64.b64decode(text, validate=True).decode()
            except (binascii.Error, ValueError):
                self.add(label, text)
                return
            self.add(f"{label} (base64 of PEM)", text)
            text = decoded.strip()
        else:
            self.add(f"{label} (base64 of PEM)", base64.b64encode(text.encode() + b"\n").decode())
            self.add(
                f"{label} (base64 of PEM, no newline)", base64.b64encode(text.encode()).decode()
            )
        body = [line for line in text.splitlines() if line and not line.startswith("-----")]
        self.add(f"{label} (DER base64)", "".join(body))
        for number, line in enumerate(body):
            self.add(f"{label} (PEM line {number + 1})", line)


@dataclass(frozen=True)
class Finding:
    where: str
    what: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}: ...{self.excerpt}..."


def _windows(value: str) -> Iterable[str]:
    if len(value) <= WINDOW:
        yield value
        return
    for start in range(0, len(value) - WINDOW + 1, STEP):
        yield value[start : start + WINDOW]
    yield value[-WINDOW:]


def _excerpt(text: str, start: int, length: int) -> str:
    """The context before a hit; nothing from the hit on (the rest of the secret)."""
    return (text[max(0, start - 50) : start] + "<SECRET>").replace("\n", "\\n")


def scan(texts: Sequence[tuple[str, str]], needles: Sequence[Needles]) -> list[Finding]:
    """Every place in ``texts`` (``(where, text)``) holding secret material."""
    findings: list[Finding] = []
    items = [item for group in needles for item in group.items]
    for where, text in texts:
        for match in _PEM_KEY.finditer(text):
            findings.append(Finding(where, "a PEM private key marker", match.group(0)))
        for match in _B64_PEM.finditer(text):
            if _decodes_to_private_key(match.group(0)):
                findings.append(
                    Finding(where, "base64 of a PEM private key", match.group(0)[:20] + "...")
                )
        for label, value in items:
            for piece in _windows(value):
                at = text.find(piece)
                if at >= 0:
                    findings.append(Finding(where, label, _excerpt(text, at, len(piece))))
                    break
    return findings


def _decodes_to_private_key(run: str) -> bool:
    usable = run[: len(run) - len(run) % 4]
    try:
        decoded = base64.b64decode(usable, validate=False)
    except (binascii.Error, ValueError):
        return False
    return b"PRIVATE KEY" in decoded


def needles_for_world(world: LocalWorld) -> Needles:
    """Every secret of a LocalWorld right now: its tokens, the ACME account key file, and
    the private keys deployed so far (the dotenv file's and the Fly apps' PRIVATEKEY)."""
    needles = Needles()
    needles.add("Cloudflare token", world.cloudflare_token)
    needles.add("Fly token (FlyV1)", world.fly_token)
    needles.add("Fly token (bare)", world.fly_token.removeprefix("FlyV1 "))
    needles.add("MailPace token", world.mailpace_token)
    account = world.workdir / "acme-account.pem"
    needles.add_key_material("ACME account key", _read(account))
    relay = world.workdir / "relay.env"
    for line in (_read(relay) or "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "PRIVATEKEY":
            needles.add_key_material("dotenv PRIVATEKEY", value)
    if world.fly is not None:
        for app in _APPS:
            stored: str | None
            try:
                stored = world.fly.secret_value(app, "PRIVATEKEY")
            except Exception:  # an app that does not exist has no secret
                stored = None
            needles.add_key_material(f"Fly {app} PRIVATEKEY", stored)
    return needles


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
