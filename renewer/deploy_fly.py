"""The ``fly`` target: new secrets in one call, then a rolling update, one machine at a time.

The steps are flyctl's restart-only deployment (fly-api.md 4.4) made strictly sequential:

1. ``POST /secrets`` with the key and the chain together -> secrets version ``v``;
2. list the machines (destroyed/destroying ones skipped), sorted by id;
3. per machine: take its lease; update it with its own current config, changing only
   ``metadata`` (release markers), with ``min_secrets_version = v`` and ``skip_launch``
   unless it is started/starting/failed (stopped machines get the secrets at their next
   start); for a launched machine wait for ``started`` at the new ``instance_id``, check
   it is not crash-looping (flyctl's 10 s smoke check), then wait until its health checks
   exist and all pass; release the lease.

The first failure stops the rollout (the remaining machines are untouched) and raises
``DeployError`` naming the app, the machine and the reason. ``app_lock`` is held for the
whole deployment so two deployments to one app never overlap.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from renewer.config import FlyTargetConfig
from renewer.errors import ApiError, DeployError
from renewer.fly import FlyClient, LeaseConflictError, Machine, MachineRequest, WaitTimeoutError
from renewer.sensitive import Secret
from renewer.targets import DeployMaterial, TargetResult

log = logging.getLogger(__name__)

# States flyctl leaves alone when it lists machines (fly-api.md 4.3).
_GONE_STATES = frozenset({"destroyed", "destroying", "replaced", "migrated"})
# Machines in these states are updated and launched; others keep their state (4.4).
_LAUNCH_STATES = frozenset({"started", "starting", "failed"})
# Checks flyctl ignores (fly-api.md 3.4).
_IGNORED_CHECK_PREFIX = "bg_deployments_compat"
# A short lease, refreshed in the background while we work (flyctl: 13 s, every 4 s), so
# a run killed mid-rollout blocks the next one for seconds, not for a whole wait_timeout.
_LEASE_TTL = 20
LEASE_DESCRIPTION = "cert-renewer"


class _LeaseKeeper:
    """Refreshes a lease every third of its TTL until the block ends."""

    def __init__(self, client: FlyClient, app: str, machine_id: str, nonce: str, ttl: int) -> None:
        self._args = (app, machine_id, nonce, ttl)
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"{threading.current_thread().name}-lease", daemon=True
        )

    def _loop(self) -> None:
        app, machine_id, nonce, ttl = self._args
        while not self._stop.wait(ttl / 3):
            try:
                self._client.refresh_lease(app, machine_id, nonce, ttl)
            except ApiError as exc:
                log.warning(
                    "fly app %s: machine %s: refreshing its lease failed: %s", app, machine_id, exc
                )

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


_PRECONDITION_ATTEMPTS = 4


# Release markers written into each machine's metadata: they also make every update a
# real config change, so the machine gets a new version (fly-api.md 7).
def marker_keys(certificate_name: str) -> tuple[str, str]:
    """The metadata keys (fingerprint, serial) of one certificate's release markers. Named
    per certificate: two certificates deployed to one app must not overwrite each other's."""
    slug = re.sub(r"[^a-z0-9]+", "_", certificate_name.lower()).strip("_") or "certificate"
    return f"cert_renewer_{slug}_fingerprint", f"cert_renewer_{slug}_serial"


class FlyTarget:
    """Deploys a certificate to one Fly app (see the module docstring).

    ``smoke_check_seconds`` is flyctl's 10 s "not crash-looping" window and
    ``poll_interval`` its 1-2 s check polling; tests make both short."""

    def __init__(
        self,
        config: FlyTargetConfig,
        client: FlyClient,
        app_lock: threading.Lock,
        *,
        certificate_name: str,
        smoke_check_seconds: float = 10.0,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._markers = marker_keys(certificate_name)
        self._config = config
        self._client = client
        self._app_lock = app_lock
        self._smoke = smoke_check_seconds
        self._poll = poll_interval
        self._clock = clock
        self._sleep = sleep

    @property
    def type(self) -> str:
        return "fly"

    @property
    def name(self) -> str:
        return self._config.app

    def deploy(self, material: DeployMaterial) -> TargetResult:
        with self._app_lock:
            return self._deploy(material)

    def rollout_problem(self) -> str | None:
        """Why the app needs a rollout although its endpoints may look fine: its machines
        carry different release markers, so an earlier rollout stopped half-way (and a
        proxy may show a probe only the machines already updated)."""
        try:
            machines = [
                m
                for m in self._client.list_machines(self._config.app)
                if m.state not in _GONE_STATES
            ]
        except ApiError as exc:
            log.warning(
                "fly app %s: cannot list machines to check the last rollout: %s", self.name, exc
            )
            return None
        markers = {
            str((m.config.get("metadata") or {}).get(self._markers[0], "")) for m in machines
        }
        if len(markers) < 2:
            return None
        shown = ", ".join(sorted(f"{m[:12]}..." if m else "none" for m in markers))
        return (
            f"fly app {self.name}: machines carry different certificates ({shown}): "
            "the last rollout did not finish"
        )

    def _fail(self, reason: str, machine_id: str | None = None) -> DeployError:
        where = f"fly app {self._config.app}"
        if machine_id is not None:
            where += f": machine {machine_id}"
        return DeployError(f"{where}: {reason}")

    def _deploy(self, material: DeployMaterial) -> TargetResult:
        app, cfg = self._config.app, self._config
        log.info(
            "fly app %s: setting secrets %s and %s in one call",
            app,
            cfg.key_secret,
            cfg.chain_secret,
        )
        try:
            version = self._client.set_secrets(
                app,
                {cfg.key_secret: material.key_b64, cfg.chain_secret: Secret(material.chain_b64)},
            )
            machines = [m for m in self._client.list_machines(app) if m.state not in _GONE_STATES]
        except ApiError as exc:
            raise self._fail(f"setting secrets or listing machines failed: {exc}") from exc
        machines.sort(key=lambda m: m.id)
        log.info(
            "fly app %s: secrets version %d; %d machine(s) to update one at a time: %s",
            app,
            version,
            len(machines),
            ", ".join(f"{m.id} ({m.state})" for m in machines) or "none",
        )
        if not machines:
            return TargetResult(
                "fly", app, "deployed", f"secrets version {version} set; the app has no machines"
            )
        outcomes = [f"{m.id} {self._roll_machine(m.id, version, material)}" for m in machines]
        log.info("fly app %s: all %d machine(s) updated", app, len(machines))
        return TargetResult(
            "fly",
            app,
            "deployed",
            f"secrets version {version}; machines updated one at a time: " + "; ".join(outcomes),
        )

    def _roll_machine(self, machine_id: str, version: int, material: DeployMaterial) -> str:
        app = self._config.app
        ttl = _LEASE_TTL
        nonce = self._take_lease(machine_id, ttl)
        log.info(
            "fly app %s: machine %s: leased (%ds, kept alive while we work)", app, machine_id, ttl
        )
        try:
            with _LeaseKeeper(self._client, app, machine_id, nonce, ttl):
                return self._update_leased(machine_id, version, material, nonce)
        except ApiError as exc:
            raise self._fail(str(exc), machine_id) from exc
        finally:
            try:
                self._client.release_lease(app, machine_id, nonce)
                log.info("fly app %s: machine %s: lease released", app, machine_id)
            except ApiError as exc:
                # The lease expires by itself after its TTL; nothing else to undo.
                log.warning(
                    "fly app %s: machine %s: releasing its lease failed: %s", app, machine_id, exc
                )

    def _take_lease(self, machine_id: str, ttl: int) -> str:
        """Takes the lease; a lease an earlier run of ours left behind (killed mid-rollout)
        is waited out, since it expires within one short TTL; anyone else's is an error."""
        app = self._config.app
        for _attempt in range(3):
            try:
                return self._client.acquire_lease(app, machine_id, ttl)
            except LeaseConflictError as exc:
                conflict = exc
            except ApiError as exc:
                raise self._fail(f"could not take its lease: {exc}", machine_id) from exc
            holder = self._client.get_lease(app, machine_id)
            wait = (holder.expires_at - time.time()) if holder and holder.expires_at else None
            if (
                holder is None
                or holder.description != LEASE_DESCRIPTION
                or wait is None
                or wait > _LEASE_TTL + 5  # ours never last longer: not a lease of ours
            ):
                break
            log.info(
                "fly app %s: machine %s: a lease left by an earlier cert-renewer run expires in "
                "%.0fs; waiting for it",
                app,
                machine_id,
                max(wait, 0),
            )
            # expires_at is whole seconds: wait past the second it names.
            self._sleep(max(wait, 0) + 1.0)
        raise self._fail(
            f"its lease is held by another client ({conflict.message}); it was not changed",
            machine_id,
        ) from conflict

    def _update_leased(
        self, machine_id: str, version: int, material: DeployMaterial, nonce: str
    ) -> str:
        app, timeout = self._config.app, self._config.wait_timeout
        machine = self._client.get_machine(app, machine_id)  # fresh config, now that we hold it
        if machine.state in _GONE_STATES:
            log.info("fly app %s: machine %s is %s; skipped", app, machine_id, machine.state)
            return f"skipped ({machine.state})"
        config = _with_markers(machine.config, material)
        launch = machine.state in _LAUNCH_STATES
        request: MachineRequest = {
            "config": config,
            "region": machine.region,
            "skip_launch": not launch,
            "min_secrets_version": version,
        }
        log.info(
            "fly app %s: machine %s (%s): updating with min_secrets_version %d%s",
            app,
            machine_id,
            machine.state,
            version,
            "" if launch else ", without starting it",
        )
        updated = self._update_with_retry(machine_id, request, nonce)
        if not launch:
            log.info(
                "fly app %s: machine %s: updated; stays down until its next start", app, machine_id
            )
            return f"updated without starting (was {machine.state})"

        log.info(
            "fly app %s: machine %s: waiting for started (version %s)",
            app,
            machine_id,
            updated.instance_id,
        )
        try:
            self._client.wait_for_state(
                app, machine_id, "started", version=updated.instance_id, timeout=timeout
            )
        except WaitTimeoutError as exc:
            state = self._client.get_machine(app, machine_id).state
            raise self._fail(
                f"did not reach state started within {timeout:g}s (state now {state})", machine_id
            ) from exc
        self._smoke_check(machine_id)
        if not _has_checks(config):
            log.info("fly app %s: machine %s: started; it has no health checks", app, machine_id)
            return "started"
        self._wait_for_checks(machine_id)
        return "started, checks passing"

    def _update_with_retry(self, machine_id: str, request: MachineRequest, nonce: str) -> Machine:
        """The secrets store is eventually consistent: right after the secrets call an
        update may be refused with 412 "min_secrets_version N is not yet available"
        (fly-api.md 4.2, shape unconfirmed), so a 412 is retried a few times."""
        app = self._config.app
        for attempt in range(1, _PRECONDITION_ATTEMPTS + 1):
            try:
                return self._client.update_machine(app, machine_id, request, nonce)
            except ApiError as exc:
                if exc.status != 412 or attempt == _PRECONDITION_ATTEMPTS:
                    raise
                log.warning(
                    "fly app %s: machine %s: update refused (%s); retrying in %ds",
                    app,
                    machine_id,
                    exc.message,
                    attempt,
                )
                self._sleep(float(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _smoke_check(self, machine_id: str) -> None:
        """Fails when the machine crashes and restarts during the first seconds after it
        started (flyctl: exit events with a non-zero code, restarting; fly-api.md 4.4)."""
        app = self._config.app
        deadline = self._clock() + self._smoke
        while True:
            reason = _crash_reason(self._client.get_machine(app, machine_id))
            if reason is not None:
                raise self._fail(f"is crash-looping after the update: {reason}", machine_id)
            left = deadline - self._clock()
            if left <= 0:
                log.info(
                    "fly app %s: machine %s: up and not restarting after %gs",
                    app,
                    machine_id,
                    self._smoke,
                )
                return
            self._sleep(min(self._poll, left))

    def _wait_for_checks(self, machine_id: str) -> None:
        """Waits until at least one check result exists and all pass (fly-api.md 4.4)."""
        app, timeout = self._config.app, self._config.wait_timeout
        deadline = self._clock() + timeout
        log.info("fly app %s: machine %s: waiting for its health checks", app, machine_id)
        while True:
            machine = self._client.get_machine(app, machine_id)
            checks = [c for c in machine.checks if not c.name.startswith(_IGNORED_CHECK_PREFIX)]
            if checks and all(c.status == "passing" for c in checks):
                log.info(
                    "fly app %s: machine %s: checks passing (%s)",
                    app,
                    machine_id,
                    ", ".join(c.name for c in checks),
                )
                return
            if machine.state != "started":
                raise self._fail(
                    f"left state started ({machine.state}) during its health checks", machine_id
                )
            if self._clock() >= deadline:
                summary = (
                    ", ".join(f"{c.name}={c.status} ({c.output})" for c in checks) or "no results"
                )
                raise self._fail(
                    f"health checks not passing after {timeout:g}s: {summary}", machine_id
                )
            self._sleep(self._poll)


def _with_markers(config: Mapping[str, Any], material: DeployMaterial) -> dict[str, Any]:
    """The machine's own config with only its metadata changed."""
    updated = dict(config)
    metadata = dict(config.get("metadata") or {})
    fingerprint_key, serial_key = marker_keys(material.certificate_name)
    metadata[fingerprint_key] = material.fingerprint_sha256
    metadata[serial_key] = material.serial
    updated["metadata"] = metadata
    return updated


def _has_checks(config: Mapping[str, Any]) -> bool:
    """Top-level checks or service checks (fly-api.md 4.4)."""
    if config.get("checks"):
        return True
    services = config.get("services") or []
    return any(
        isinstance(s, dict) and (s.get("checks") or s.get("tcp_checks") or s.get("http_checks"))
        for s in services
    )


def _crash_reason(machine: Machine) -> str | None:
    """Why the machine looks crash-looping since its last update, or None."""
    if machine.state in {"restarting", "failed", "stopped", "destroyed"}:
        return f"state is {machine.state}"
    for event in machine.events:  # newest first; stop at the update that made this version
        if event.type in {"update", "launch"}:
            break
        if event.type == "exit" and (event.restarting or (event.exit_code or 0) != 0):
            return f"its process exited with code {event.exit_code} and is being restarted"
    return None
