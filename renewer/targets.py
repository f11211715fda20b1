"""What every deployment target receives and returns, and the target interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from renewer.sensitive import Secret

TargetStatus = Literal["deployed", "skipped", "failed"]


@dataclass(frozen=True)
class DeployMaterial:
    """The validated certificate in the form apps read it: ``base64 -w 0`` of each PEM."""

    certificate_name: str
    key_b64: Secret
    chain_b64: str
    serial: str
    fingerprint_sha256: str


@dataclass(frozen=True)
class TargetResult:
    type: str
    name: str
    status: TargetStatus
    detail: str


class Target(Protocol):
    """A place a certificate is pushed to. ``deploy`` raises ``DeployError`` on failure."""

    @property
    def type(self) -> str: ...

    @property
    def name(self) -> str: ...

    def deploy(self, material: DeployMaterial) -> TargetResult: ...

    def rollout_problem(self) -> str | None:
        """A reason to deploy again although the endpoints look fine, or None."""
        ...
