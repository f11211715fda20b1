"""What one run carries through its steps: options, settings, clients, roots, the clock."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509

from renewer.certs import load_roots, system_roots
from renewer.config import Settings
from renewer.services import Services


@dataclass(frozen=True)
class RunOptions:
    force: bool = False
    dry_run: bool = False
    probe_timeout: float = 10.0
    verify_timeout: float = 300.0


@dataclass
class RunContext:
    settings: Settings
    options: RunOptions
    services: Services
    roots: Sequence[x509.Certificate]
    use_system_roots: bool
    now: Callable[[], datetime]
    app_locks: dict[str, threading.Lock] = field(default_factory=dict)


def make_context(
    settings: Settings,
    options: RunOptions,
    services: Services,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> RunContext:
    bundle = settings.config.acme.ca_bundle
    return RunContext(
        settings=settings,
        options=options,
        services=services,
        # The system roots are parsed once per run, not once per chain checked.
        roots=[*load_roots(None if bundle is None else services.cwd / bundle), *system_roots()],
        use_system_roots=False,
        now=now,
    )
