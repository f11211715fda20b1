"""A Fly.io Machines API emulator whose machines are real local SMTP server processes.

Modelled on fly-api.md section 8 (the checklist), with its shapes from sections 2-4 and 6:

- apps: ``POST /v1/apps`` (``name`` or ``app_name``, 201 ``{id, created_at}``, 422
  ``name_taken``), ``GET`` (404 unknown, 403 held by another org), list, ``DELETE`` (202);
- secrets: one versioned store per app; bulk ``POST /v1/apps/{app}/secrets`` with ``null``
  to unset answers ``{"secrets", "version", "Version"}``; lists give names and digests only;
- machines: ``instance_id`` changes on every update, states, events (newest first),
  ``checks`` (real TCP connects), ``skip_launch``, ``min_secrets_version`` (412 when above
  the store's version), immutable ``region``/``name``;
- leases: 201 with a nonce, 409 for a second holder; update/start/stop/delete of a leased
  machine without its nonce answer 409; release needs the nonce;
- ``/wait`` with ``state``, ``timeout`` (<= 60 s) and ``version``; 408 ``{"error"}``;
- errors are ``{"error": "...", "status": "..."}``; per-token app scopes (``FlyV1`` macaroon
  lists where any piece may allow, or ``Bearer``).

A machine whose ``config.env`` has ``SMTP_LISTEN`` (``"587/starttls,465/tls"``: internal
port and mode) runs ``python -m emulators.smtp_server`` listening on a fresh loopback port
per internal port, with the app's secrets in its environment at boot (the key/chain
variable names come from ``SMTP_KEY_VAR``/``SMTP_CHAIN_VAR``, default PRIVATEKEY/FULLCHAIN).
Other machines (e.g. the renewer's scheduled job) run an idle placeholder process; a
scheduled one exits 0 shortly after it starts, as a finished job does.

``front_port(app, internal_port)`` is the app's "Fly proxy": a loopback TCP port that
spreads connections round-robin over the app's started machines.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from emulators.processes import stop_process

_REPO_ROOT = Path(__file__).resolve().parents[1]
_APP_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MAX_WAIT = 60
_READY_TIMEOUT = 20.0
_CRASH_RESTART_DELAY = 0.3
_LEASE_HEADER = "fly-machine-lease-nonce"
_RUNNING = frozenset({"started", "starting"})


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str = "unknown") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _ulid() -> str:
    """A 26-character ULID-like id, the shape of ``instance_id`` and event ids."""
    stamp = int(time.time() * 1000)
    head = "".join(_CROCKFORD[(stamp >> (5 * i)) & 31] for i in reversed(range(10)))
    return head + "".join(secrets.choice(_CROCKFORD) for _ in range(16))


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse_duration(value: object, default: float) -> float:
    """Go duration strings as fly-go sends them (``"15s"``, ``"500ms"``, ``"1m"``)."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value.strip())
    if not match:
        return default
    number = float(match.group(1))
    return number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]


def _ready_ports(ready: Path | None) -> list[int] | None:
    """The ports an SMTP machine process bound, from the ready file it wrote atomically."""
    if ready is None:
        return None
    try:
        ports = json.loads(ready.read_text()).get("ports")
    except (OSError, ValueError, AttributeError):
        return None
    return [int(p) for p in ports] if isinstance(ports, list) else None


def _machine_listen(machine: _Machine) -> str:
    return str((machine.config.get("env") or {}).get("SMTP_LISTEN", ""))


def parse_listen(value: str) -> list[tuple[int, str]]:
    """``"587/starttls,465/tls"`` -> [(587, "starttls"), (465, "tls")]; mode defaults to
    implicit TLS for 465 and STARTTLS otherwise (as in DESIGN.md's endpoints)."""
    result: list[tuple[int, str]] = []
    for raw in value.split(","):
        part = raw.strip()
        if not part:
            continue
        port_text, _, mode = part.partition("/")
        port = int(port_text)
        result.append((port, mode or ("tls" if port == 465 else "starttls")))
    return result


@dataclass(frozen=True)
class MachineSpec:
    """A machine for ``FlyApi.add_app``: an SMTP server on the given internal ports."""

    listen: tuple[str, ...] = ("2525/starttls",)
    state: Literal["started", "stopped"] = "started"
    checks: bool = True  # a TCP check on the first listen port
    region: str = "cdg"
    name: str | None = None
    schedule: str | None = None
    restart_policy: str = "always"
    metadata: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    key_var: str = "PRIVATEKEY"
    chain_var: str = "FULLCHAIN"

    def config(self, app: str) -> dict[str, Any]:
        """The MachineConfig this spec stands for (fly-api.md 3.3)."""
        ports = [port for port, _ in parse_listen(",".join(self.listen))]
        config: dict[str, Any] = {
            "image": f"registry.fly.io/{app}:smtp",
            "env": {
                "SMTP_LISTEN": ",".join(self.listen),
                "SMTP_KEY_VAR": self.key_var,
                "SMTP_CHAIN_VAR": self.chain_var,
                **self.env,
            },
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "restart": {"policy": self.restart_policy},
            "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"}
            | dict(self.metadata),
            "services": [
                {"protocol": "tcp", "internal_port": port, "ports": [{"port": port}]}
                for port in ports
            ],
        }
        if self.checks and ports:
            config["checks"] = {
                "smtp": {"type": "tcp", "port": ports[0], "interval": "1s", "timeout": "2s"}
            }
        if self.schedule:
            config["schedule"] = self.schedule
        return config


@dataclass
class UpdateWindow:
    """One machine update: from the update request until the machine settled (started
    with its checks passing, or stopped/created with ``skip_launch``) and, when the update
    was made under a lease, until that lease was released."""

    machine_id: str
    instance_id: str
    skip_launch: bool
    started_at: float
    lease_nonce: str | None
    settled_at: float | None = None
    lease_released_at: float | None = None

    @property
    def end(self) -> float:
        ends = [t for t in (self.settled_at, self.lease_released_at) if t is not None]
        if self.lease_nonce is not None and self.lease_released_at is None:
            return float("inf")
        return max(ends) if ends else float("inf")


@dataclass(frozen=True)
class LoggedRequest:
    """One API request as seen by the emulator (never an Authorization value)."""

    method: str
    path: str
    query: str
    status: int
    auth_scheme: str | None
    lease_nonce_sent: bool


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int | None
    times: int
    retry_after: float | None
    delay: float


@dataclass
class _Lease:
    nonce: str
    expires_at: float
    owner: str
    description: str
    version: str


@dataclass
class _Secret:
    value: str
    digest: str
    created_at: str
    updated_at: str


@dataclass
class _App:
    id: str
    name: str
    org_slug: str
    numeric_id: int
    created_ms: int
    secrets: dict[str, _Secret] = field(default_factory=dict)
    secrets_version: int = 0
    secrets_calls: int = 0
    machines: dict[str, _Machine] = field(default_factory=dict)
    updates: list[UpdateWindow] = field(default_factory=list)
    idempotency_key: str | None = None


@dataclass
class _Machine:
    id: str
    name: str
    app: str
    region: str
    config: dict[str, Any]
    instance_id: str
    created_at: str
    updated_at: str
    state: str = "created"
    events: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    lease: _Lease | None = None
    process: subprocess.Popen[bytes] | None = None
    host_ports: dict[int, int] = field(default_factory=dict)
    booted_secrets_version: int | None = None
    restart_count: int = 0
    launch_seq: int = 0
    launched_at: float = 0.0
    never_starts: bool = False
    fails_checks: bool = False
    crash_loop: bool = False


@dataclass(frozen=True)
class MachineView:
    """What a test may inspect about a machine, beyond the API's own view."""

    id: str
    state: str
    instance_id: str
    booted_secrets_version: int | None
    host_ports: Mapping[int, int]
    restart_count: int
    config: Mapping[str, Any]
    pid: int | None


class FlyApi:
    """``FlyApi(workdir, tokens=...)``: ``tokens`` maps each accepted token (``fm2_...`` or
    an opaque bearer token) to the app names it may touch, or None for every app (an org
    token; only those may create apps). Context manager; ``base_url`` has no ``/v1``."""

    def __init__(
        self,
        workdir: Path,
        *,
        tokens: Mapping[str, frozenset[str] | None],
        org_slug: str = "personal",
        check_interval: float = 0.25,
    ) -> None:
        self.workdir = workdir
        self._tokens = dict(tokens)
        self._org_slug = org_slug
        self._check_interval = check_interval
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._apps: dict[str, _App] = {}
        self._foreign: set[str] = set()
        self._faults: list[_Fault] = []
        self._log: list[LoggedRequest] = []
        self._fronts: dict[tuple[str, int], _FrontProxy] = {}
        self._rr = itertools.count()
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._numeric_ids = itertools.count(1000)

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FlyApi:
        self.workdir.mkdir(parents=True, exist_ok=True)
        api = self

        class Handler(_Handler):
            owner = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        server = self._server
        for target in (lambda: server.serve_forever(poll_interval=0.05), self._check_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._closing = True
            self._changed.notify_all()
            procs = [m.process for a in self._apps.values() for m in a.machines.values()]
            for app in self._apps.values():
                for machine in app.machines.values():
                    machine.launch_seq += 1
                    machine.process = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for front in list(self._fronts.values()):
            front.close()
        for proc in procs:
            if proc is not None:
                _terminate(proc)
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use FlyApi as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- test helpers: setup -----------------------------------------------------------------

    def add_app(
        self,
        name: str,
        machines: Sequence[MachineSpec] = (),
        *,
        secrets: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Create an app with machines (started ones are launched now); returns their ids
        sorted. Initial ``secrets`` count as secrets version 1 (not as an API call)."""
        with self._lock:
            app = self._new_app(name, self._org_slug)
            if secrets:
                self._store_secrets(app, dict(secrets))
            ids = []
            for spec in machines:
                machine = self._new_machine(app, spec.config(name), spec.region, spec.name)
                if spec.state == "started":
                    self._launch(machine)
                else:
                    machine.state = "stopped"
                ids.append(machine.id)
        return sorted(ids)

    def add_foreign_app(self, name: str) -> None:
        """A name held by another organisation: 403 on GET, ``name_taken`` on create."""
        with self._lock:
            self._foreign.add(name)

    def front_port(self, app: str, internal_port: int) -> int:
        """A loopback port spreading connections round-robin over the app's started
        machines listening on ``internal_port`` (what Fly's proxy does for a service)."""
        with self._lock:
            front = self._fronts.get((app, internal_port))
            if front is None:
                front = _FrontProxy(lambda: self._pick_backend(app, internal_port))
                self._fronts[(app, internal_port)] = front
            return front.port

    def inject_fault(
        self,
        method: str,
        path_pattern: str,
        status: int | None,
        times: int = 1,
        *,
        retry_after: float | None = None,
        delay: float = 0.0,
    ) -> None:
        """The next ``times`` requests whose method matches (``"*"`` for any) and whose path
        matches the regex (``re.search``) wait ``delay`` seconds, then answer ``status``
        with ``{"error", "status"}`` (and Retry-After if given); ``status=None`` only delays."""
        with self._lock:
            self._faults.append(
                _Fault(method.upper(), re.compile(path_pattern), status, times, retry_after, delay)
            )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            for app in self._apps.values():
                for machine in app.machines.values():
                    machine.never_starts = machine.fails_checks = machine.crash_loop = False

    def machine_never_starts(self, app: str, machine_id: str, value: bool = True) -> None:
        """From its next launch on, the machine stays ``starting`` and runs nothing."""
        with self._lock:
            self._machine(app, machine_id).never_starts = value

    def machine_fails_checks(self, app: str, machine_id: str, value: bool = True) -> None:
        """Its checks report ``critical`` whatever the server does."""
        with self._lock:
            self._machine(app, machine_id).fails_checks = value

    def crash_loop(self, app: str, machine_id: str, value: bool = True) -> None:
        """From its next launch on, the machine's process exits 1 soon after it starts and
        is restarted by its restart policy, with ``exit`` events recording each crash."""
        with self._lock:
            self._machine(app, machine_id).crash_loop = value

    def tick(self, app: str) -> list[str]:
        """The scheduler's tick: start every scheduled machine that is not running."""
        with self._lock:
            started = []
            for machine in sorted(self._app(app).machines.values(), key=lambda m: m.id):
                if machine.config.get("schedule") and machine.state in {"stopped", "created"}:
                    self._launch(machine)
                    started.append(machine.id)
            return started

    # -- test helpers: inspection ------------------------------------------------------------

    @property
    def request_log(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def secrets_calls(self, app: str) -> int:
        """How many API calls changed the app's secrets."""
        with self._lock:
            return self._app(app).secrets_calls

    def secrets_version(self, app: str) -> int:
        with self._lock:
            return self._app(app).secrets_version

    def secret_value(self, app: str, name: str) -> str | None:
        """The stored value (the real API never shows it; tests may)."""
        with self._lock:
            stored = self._app(app).secrets.get(name)
            return stored.value if stored else None

    def machine(self, app: str, machine_id: str) -> MachineView:
        with self._lock:
            m = self._machine(app, machine_id)
            return MachineView(
                id=m.id,
                state=m.state,
                instance_id=m.instance_id,
                booted_secrets_version=m.booted_secrets_version,
                host_ports=dict(m.host_ports),
                restart_count=m.restart_count,
                config=copy.deepcopy(m.config),
                pid=m.process.pid if m.process else None,
            )

    def machine_ids(self, app: str) -> list[str]:
        with self._lock:
            return sorted(self._app(app).machines)

    def update_timeline(self, app: str) -> list[UpdateWindow]:
        with self._lock:
            return [copy.copy(window) for window in self._app(app).updates]

    def overlapping_updates(self, app: str) -> list[tuple[UpdateWindow, UpdateWindow]]:
        """Pairs of updates of different machines of ``app`` whose windows overlap."""
        windows = self.update_timeline(app)
        return [
            (a, b)
            for a, b in itertools.combinations(windows, 2)
            if a.machine_id != b.machine_id and a.started_at < b.end and b.started_at < a.end
        ]

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Poll a test predicate (e.g. on ``machine(...)``) until true or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    # -- internals: model ------------------------------------------------------------------

    def _app(self, name: str) -> _App:
        app = self._apps.get(name)
        if app is None:
            raise _HttpError(404, "app not found")
        return app

    def _machine(self, app: str, machine_id: str) -> _Machine:
        machine = self._app(app).machines.get(machine_id)
        if machine is None or machine.state == "destroyed":
            raise _HttpError(404, "machine not found")
        return machine

    def _new_app(self, name: str, org_slug: str) -> _App:
        if name in self._apps or name in self._foreign:
            raise _HttpError(422, "Name has already been taken", "name_taken")
        app = _App(
            id=secrets.token_hex(8),
            name=name,
            org_slug=org_slug,
            numeric_id=next(self._numeric_ids),
            created_ms=_now_ms(),
        )
        self._apps[name] = app
        (self.workdir / name).mkdir(parents=True, exist_ok=True)
        return app

    def _store_secrets(self, app: _App, values: Mapping[str, str | None]) -> None:
        now = _now_iso()
        for name, value in values.items():
            if value is None:
                app.secrets.pop(name, None)
                continue
            digest = hashlib.sha256(value.encode()).hexdigest()[:16]
            created = app.secrets[name].created_at if name in app.secrets else now
            app.secrets[name] = _Secret(value, digest, created, now)
        app.secrets_version += 1
        self._changed.notify_all()

    def _new_machine(
        self, app: _App, config: dict[str, Any], region: str, name: str | None
    ) -> _Machine:
        machine_id = secrets.token_hex(7)
        now = _now_iso()
        machine = _Machine(
            id=machine_id,
            name=name or f"machine-{machine_id[:6]}",
            app=app.name,
            region=region,
            config=copy.deepcopy(config),
            instance_id=_ulid(),
            created_at=now,
            updated_at=now,
        )
        app.machines[machine_id] = machine
        self._event(machine, "launch", "created", source="user")
        return machine

    def _event(
        self,
        machine: _Machine,
        kind: str,
        status: str,
        *,
        source: str = "flyd",
        request: dict[str, Any] | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "id": _ulid(),
            "type": kind,
            "status": status,
            "source": source,
            "timestamp": _now_ms(),
        }
        if request is not None:
            event["request"] = request
        machine.events.insert(0, event)
        del machine.events[50:]

    def _set_state(self, machine: _Machine, state: str) -> None:
        machine.state = state
        self._settle_updates(machine)
        self._changed.notify_all()

    def _settle_updates(self, machine: _Machine) -> None:
        app = self._apps.get(machine.app)
        if app is None:
            return
        checks_ok = not machine.config.get("checks") or (
            bool(machine.checks) and all(c["status"] == "passing" for c in machine.checks.values())
        )
        for window in app.updates:
            if window.machine_id != machine.id or window.settled_at is not None:
                continue
            if window.lease_released_at is not None:
                # The updater let go of the machine before it settled: that was the end.
                window.settled_at = window.lease_released_at
            elif window.instance_id != machine.instance_id:
                window.settled_at = time.monotonic()  # superseded by a newer update
            elif (machine.state == "started" and checks_ok) or (
                window.skip_launch and machine.state not in _RUNNING
            ):
                window.settled_at = time.monotonic()

    def _stop_process(self, machine: _Machine) -> None:
        machine.launch_seq += 1  # the supervisor of the old process stops caring
        proc, machine.process = machine.process, None
        machine.host_ports = {}
        machine.checks = {}
        if proc is not None:
            reaper = threading.Thread(target=_terminate, args=(proc,), daemon=True)
            reaper.start()
            self._threads.append(reaper)

    def _launch(self, machine: _Machine) -> None:
        """Boot the machine with the app's current secrets (as Fly injects them at boot)."""
        app = self._apps[machine.app]
        self._stop_process(machine)
        machine.booted_secrets_version = app.secrets_version
        machine.launched_at = time.monotonic()
        seq = machine.launch_seq
        self._set_state(machine, "starting")
        if machine.never_starts:
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(_REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            "FLY_APP_NAME": app.name,
            "FLY_MACHINE_ID": machine.id,
            "FLY_MACHINE_VERSION": machine.instance_id,
            "FLY_REGION": machine.region,
            "FLY_IMAGE_REF": str(machine.config.get("image", "")),
            "FLY_PROCESS_GROUP": str(
                machine.config.get("metadata", {}).get("fly_process_group", "app")
            ),
        }
        env.update({name: s.value for name, s in app.secrets.items()})
        env.update({str(k): str(v) for k, v in (machine.config.get("env") or {}).items()})
        base = self.workdir / app.name / f"{machine.id}-{seq}"
        ready = base.with_suffix(".ready")
        listen = parse_listen(env.get("SMTP_LISTEN", ""))
        if machine.crash_loop:
            argv = [
                sys.executable,
                "-I",
                "-S",
                "-c",
                "import sys, time; time.sleep(0.1); sys.exit(1)",
            ]
            ready_file = None
        elif listen:
            # Each process binds free ports itself and reports them in its ready file:
            # picking a port here and binding it there races with every other process.
            machine.host_ports = {}
            argv = [sys.executable, "-m", "emulators.smtp_server"]
            for _port, mode in listen:
                argv += ["--listen", f"127.0.0.1:0/{mode}"]
            argv += [
                "--key-var",
                env.get("SMTP_KEY_VAR", "PRIVATEKEY"),
                "--chain-var",
                env.get("SMTP_CHAIN_VAR", "FULLCHAIN"),
                "--ready-file",
                str(ready),
            ]
            ready_file = ready
        else:
            # Not an SMTP image: a scheduled job finishes quickly, anything else idles.
            seconds = 0.5 if machine.config.get("schedule") else 86400
            argv = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
            ready_file = None
        with base.with_suffix(".log").open("ab") as log_file:
            proc = subprocess.Popen(
                argv, env=env, cwd=str(self.workdir), stdout=log_file, stderr=subprocess.STDOUT
            )
        machine.process = proc
        thread = threading.Thread(
            target=self._supervise, args=(machine, seq, proc, ready_file), daemon=True
        )
        thread.start()

    def _supervise(
        self, machine: _Machine, seq: int, proc: subprocess.Popen[bytes], ready: Path | None
    ) -> None:
        """Marks the machine started once its process is ready; on an unrequested exit,
        records an ``exit`` event and applies the restart policy."""
        deadline = time.monotonic() + _READY_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if ready is None or ready.exists():
                ports = _ready_ports(ready)
                with self._lock:
                    if machine.launch_seq == seq and machine.state == "starting":
                        if ports is not None:
                            internal = [p for p, _ in parse_listen(_machine_listen(machine))]
                            machine.host_ports = dict(zip(internal, ports, strict=False))
                        self._set_state(machine, "started")
                        self._event(machine, "start", "started")
                break
            time.sleep(0.02)
        code = proc.wait()
        with self._lock:
            if machine.launch_seq != seq or self._closing:
                return
            policy = str((machine.config.get("restart") or {}).get("policy", "always"))
            restarting = policy == "always" or (policy == "on-failure" and code != 0)
            self._event(
                machine,
                "exit",
                "stopped",
                request={
                    "exit_event": {
                        "exit_code": code,
                        "oom_killed": False,
                        "requested_stop": False,
                        "restarting": restarting,
                        "signal": -1,
                        "exited_at": _now_iso(),
                    },
                    "restart_count": machine.restart_count,
                },
            )
            machine.process = None
            machine.checks = {}
            if not restarting:
                self._set_state(machine, "stopped")
                return
            machine.restart_count += 1
        time.sleep(_CRASH_RESTART_DELAY)
        with self._lock:
            if machine.launch_seq == seq and not self._closing:
                self._launch(machine)

    def _pick_backend(self, app_name: str, internal_port: int) -> int | None:
        with self._lock:
            app = self._apps.get(app_name)
            if app is None:
                return None
            ports = [
                m.host_ports[internal_port]
                for m in sorted(app.machines.values(), key=lambda m: m.id)
                if m.state == "started" and internal_port in m.host_ports
            ]
            return ports[next(self._rr) % len(ports)] if ports else None

    def _check_loop(self) -> None:
        """Runs every machine's TCP checks for real, every ``check_interval`` seconds."""
        while True:
            with self._lock:
                if self._closing:
                    return
                todo = [
                    (m, name, spec, m.host_ports.get(int(spec.get("port", 0))), m.launch_seq)
                    for app in self._apps.values()
                    for m in app.machines.values()
                    if m.state == "started"
                    for name, spec in (m.config.get("checks") or {}).items()
                    if time.monotonic() - m.launched_at
                    >= _parse_duration(spec.get("grace_period"), 0.0)
                ]
            for machine, name, spec, port, seq in todo:
                status, output = self._run_check(machine, spec, port)
                with self._lock:
                    if machine.launch_seq != seq or machine.state != "started":
                        continue
                    machine.checks[name] = {
                        "name": name,
                        "status": status,
                        "output": output,
                        "updated_at": _now_iso(),
                    }
                    self._settle_updates(machine)
                    self._changed.notify_all()
            time.sleep(self._check_interval)

    @staticmethod
    def _run_check(machine: _Machine, spec: Mapping[str, Any], port: int | None) -> tuple[str, str]:
        if machine.fails_checks:
            return "critical", "injected failure: connection refused"
        if spec.get("type", "tcp") != "tcp":
            return "passing", "only tcp checks are emulated"
        if port is None:
            return "critical", f"nothing listens on internal port {spec.get('port')}"
        timeout = min(_parse_duration(spec.get("timeout"), 2.0), 2.0)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                return "passing", "Success"
        except OSError as exc:
            return "critical", f"dial tcp: {exc.strerror or exc}"

    # -- internals: HTTP -------------------------------------------------------------------

    def handle(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(url)
        path, query = parts.path, parse_qs(parts.query)
        auth = headers.get("authorization")
        scheme = auth.split(" ", 1)[0] if auth else None
        nonce = headers.get(_LEASE_HEADER)
        status, payload, extra = self._handle(
            method, path=path, query=query, auth=auth, nonce=nonce, raw=body
        )
        with self._lock:
            self._log.append(
                LoggedRequest(method, path, parts.query, status, scheme, nonce is not None)
            )
        return status, payload, extra

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.method in {"*", method} and fault.pattern.search(path):
                    fault.times -= 1
                    return fault
        return None

    def _handle(
        self,
        method: str,
        *,
        path: str,
        query: dict[str, list[str]],
        auth: str | None,
        nonce: str | None,
        raw: bytes,
    ) -> tuple[int, Any, dict[str, str]]:
        fault = self._take_fault(method, path)
        if fault is not None:
            time.sleep(fault.delay)
            if fault.status is not None:
                extra = {}
                if fault.retry_after is not None:
                    extra["Retry-After"] = f"{fault.retry_after:g}"
                return fault.status, _err(f"injected fault {fault.status}", "unknown"), extra
        try:
            scope = self._authorize(auth)
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise _HttpError(400, "request body is not valid JSON") from exc
            status, payload = self._route(
                method, path=path, query=query, scope=scope, nonce=nonce, body=body
            )
            return status, payload, {}
        except _HttpError as exc:
            return exc.status, _err(exc.message, exc.code), {}

    def _authorize(self, header: str | None) -> frozenset[str] | None:
        """Returns the apps the header's tokens allow (None = all); raises 401.
        Schemes are stripped as fly-go does; any comma-separated piece may allow."""
        if not header:
            raise _HttpError(401, "You must be authenticated to view this.")
        value = header.strip()
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("FlyV1 ", "Bearer "):
                if value.startswith(prefix):
                    value = value[len(prefix) :].strip()
                    stripped = True
        allowed: set[str] = set()
        known = False
        for piece in (p.strip() for p in value.split(",")):
            if piece in self._tokens:
                known = True
                scope = self._tokens[piece]
                if scope is None:
                    return None
                allowed |= scope
        if not known:
            raise _HttpError(401, "You must be authenticated to view this.")
        return frozenset(allowed)

    @staticmethod
    def _check_scope(scope: frozenset[str] | None, app: str) -> None:
        if scope is not None and app not in scope:
            raise _HttpError(403, f"token does not grant access to app {app}")

    def _route(
        self,
        method: str,
        *,
        path: str,
        query: dict[str, list[str]],
        scope: frozenset[str] | None,
        nonce: str | None,
        body: Any,
    ) -> tuple[int, Any]:
        segments = [s for s in path.split("/") if s]
        if len(segments) < 2 or segments[0] != "v1" or segments[1] != "apps":
            raise _HttpError(404, f"no route for {method} {path}")
        rest = segments[2:]
        if not rest:
            if method == "GET":
                return self._list_apps(scope, _first(query, "org_slug"))
            if method == "POST":
                return self._create_app(scope, body)
            raise _HttpError(405, "method not allowed")
        app_name = rest[0]
        self._check_scope(scope, app_name)
        with self._lock:
            if app_name in self._foreign:
                raise _HttpError(403, f"app {app_name} belongs to another organization")
            if len(rest) == 1:
                if method == "GET":
                    return 200, self._app_json(self._app(app_name))
                if method == "DELETE":
                    self._delete_app(app_name)
                    return 202, None
                raise _HttpError(405, "method not allowed")
            app = self._app(app_name)
            if rest[1] == "secrets":
                return self._secrets(method, app, rest[2:], body)
            if rest[1] == "machines":
                return self._machines(
                    method, app=app, rest=rest[2:], query=query, nonce=nonce, body=body
                )
        raise _HttpError(404, f"no route for {method} {path}")

    # apps

    def _app_json(self, app: _App) -> dict[str, Any]:
        return {
            "id": app.id,
            "name": app.name,
            "status": "deployed" if app.machines else "pending",
            "internal_numeric_id": app.numeric_id,
            "machine_count": sum(1 for m in app.machines.values() if m.state != "destroyed"),
            "volume_count": 0,
            "network": "default",
            "organization": {"name": app.org_slug, "slug": app.org_slug},
        }

    def _list_apps(self, scope: frozenset[str] | None, org: str | None) -> tuple[int, Any]:
        with self._lock:
            apps = [
                self._app_json(app)
                for app in self._apps.values()
                if (scope is None or app.name in scope) and (org is None or app.org_slug == org)
            ]
        return 200, {"total_apps": len(apps), "apps": apps}

    def _create_app(self, scope: frozenset[str] | None, body: Any) -> tuple[int, Any]:
        if scope is not None:
            raise _HttpError(403, "creating apps needs an organization token")
        if not isinstance(body, dict):
            raise _HttpError(400, "request body must be a JSON object")
        # fly-api.md 2: the current spec says "name", the prose docs "app_name".
        name = body.get("name") or body.get("app_name")
        org = body.get("org_slug")
        if not isinstance(name, str) or not _APP_NAME_RE.match(name):
            raise _HttpError(400, "name must be lowercase letters, digits and dashes")
        if not isinstance(org, str) or not org:
            raise _HttpError(400, "org_slug is required")
        key = body.get("idempotency_key")
        with self._lock:
            existing = self._apps.get(name)
            if existing is not None and key and existing.idempotency_key == key:
                return 201, {"id": existing.id, "created_at": existing.created_ms}
            if key and any(a.idempotency_key == key for a in self._apps.values()):
                raise _HttpError(422, "idempotency_key was used for another app")
            app = self._new_app(name, org)
            app.idempotency_key = key if isinstance(key, str) else None
            return 201, {"id": app.id, "created_at": app.created_ms}

    def _delete_app(self, name: str) -> None:
        app = self._app(name)
        for machine in app.machines.values():
            self._stop_process(machine)
            self._set_state(machine, "destroyed")
        del self._apps[name]

    # secrets

    def _secret_json(self, name: str, stored: _Secret) -> dict[str, Any]:
        return {
            "name": name,
            "digest": stored.digest,
            "created_at": stored.created_at,
            "updated_at": stored.updated_at,
        }

    def _secrets(self, method: str, app: _App, rest: list[str], body: Any) -> tuple[int, Any]:
        if not rest:
            if method == "GET":
                items = [self._secret_json(n, s) for n, s in sorted(app.secrets.items())]
                return 200, {"secrets": items}
            if method != "POST":
                raise _HttpError(405, "method not allowed")
            values = body.get("values") if isinstance(body, dict) else None
            if not isinstance(values, dict) or not values:
                raise _HttpError(400, "values must be a non-empty object")
            for name, value in values.items():
                if not _SECRET_NAME_RE.match(name):
                    raise _HttpError(400, f"invalid secret name {name!r}")
                if value is not None and not isinstance(value, str):
                    raise _HttpError(400, f"secret {name} must be a string or null")
            self._store_secrets(app, values)
            app.secrets_calls += 1
            items = [self._secret_json(n, s) for n, s in sorted(app.secrets.items())]
            version = app.secrets_version
            return 200, {"secrets": items, "version": version, "Version": version}
        name = rest[0]
        if method == "GET":
            if name not in app.secrets:
                raise _HttpError(404, "secret not found")
            return 200, self._secret_json(name, app.secrets[name])
        if method == "POST":
            value = body.get("value") if isinstance(body, dict) else None
            if not _SECRET_NAME_RE.match(name) or not isinstance(value, str):
                raise _HttpError(400, "a valid name and a string value are required")
            self._store_secrets(app, {name: value})
            app.secrets_calls += 1
            version = app.secrets_version
            return 201, self._secret_json(name, app.secrets[name]) | {
                "version": version,
                "Version": version,
            }
        if method == "DELETE":
            self._store_secrets(app, {name: None})
            app.secrets_calls += 1
            return 200, {"version": app.secrets_version, "Version": app.secrets_version}
        raise _HttpError(405, "method not allowed")

    # machines

    def _machine_json(self, machine: _Machine, limit: int = 20) -> dict[str, Any]:
        image = str(machine.config.get("image", ""))
        repo, _, tag = image.partition(":")
        return {
            "id": machine.id,
            "name": machine.name,
            "state": machine.state,
            "region": machine.region,
            "instance_id": machine.instance_id,
            "private_ip": f"fdaa:0:1:a7b::{int(machine.id[:4], 16):x}",
            "config": copy.deepcopy(machine.config),
            "image_ref": {
                "registry": repo.split("/")[0] if "/" in repo else "",
                "repository": repo.split("/", 1)[-1],
                "tag": tag,
                "digest": "sha256:" + hashlib.sha256(image.encode()).hexdigest(),
                "labels": {},
            },
            "created_at": machine.created_at,
            "updated_at": machine.updated_at,
            "events": copy.deepcopy(machine.events[:limit]),
            "checks": [copy.deepcopy(c) for _, c in sorted(machine.checks.items())],
            "host_status": "ok",
            "cordoned": False,
            "incomplete_config": None,
        }

    def _lease_of(self, machine: _Machine) -> _Lease | None:
        if machine.lease is not None and machine.lease.expires_at <= time.time():
            self._lease_ended(machine)
        return machine.lease

    def _lease_ended(self, machine: _Machine) -> None:
        lease, machine.lease = machine.lease, None
        if lease is None:
            return
        for window in self._apps[machine.app].updates:
            if window.lease_nonce == lease.nonce and window.lease_released_at is None:
                window.lease_released_at = time.monotonic()

    def _require_lease(self, machine: _Machine, nonce: str | None) -> None:
        lease = self._lease_of(machine)
        if lease is not None and lease.nonce != nonce:
            raise _HttpError(409, f"machine {machine.id} lease currently held by {lease.owner}")

    def _check_secrets_version(self, app: _App, body: Mapping[str, Any]) -> None:
        wanted = body.get("min_secrets_version")
        if wanted is None:
            return
        if not isinstance(wanted, int) or wanted < 0:
            raise _HttpError(400, "min_secrets_version must be a non-negative integer")
        if wanted > app.secrets_version:
            raise _HttpError(412, f"min_secrets_version {wanted} is not yet available on this app")

    def _machines(
        self,
        method: str,
        *,
        app: _App,
        rest: list[str],
        query: dict[str, list[str]],
        nonce: str | None,
        body: Any,
    ) -> tuple[int, Any]:
        if not rest:
            if method == "GET":
                return 200, self._list_machines(app, query)
            if method == "POST":
                return 200, self._create_machine(app, body)
            raise _HttpError(405, "method not allowed")
        machine = self._machine(app.name, rest[0])
        action = rest[1] if len(rest) > 1 else None
        if action is None:
            if method == "GET":
                return 200, self._machine_json(machine)
            if method == "POST":
                return 200, self._update_machine(app, machine, body, nonce)
            if method == "DELETE":
                self._require_lease(machine, nonce)
                force = _first(query, "force") == "true" or _first(query, "kill") == "true"
                if machine.state in _RUNNING and not force:
                    raise _HttpError(
                        412, "unable to destroy machine, not currently stopped, suspended or failed"
                    )
                self._stop_process(machine)
                self._set_state(machine, "destroyed")
                self._event(machine, "destroy", "destroyed", source="user")
                return 200, {"ok": True}
            raise _HttpError(405, "method not allowed")
        if action == "start" and method == "POST":
            self._require_lease(machine, nonce)
            previous = machine.state
            if previous not in _RUNNING:
                self._launch(machine)
            return 200, {"previous_state": previous, "migrated": False, "new_host": ""}
        if action == "stop" and method == "POST":
            self._require_lease(machine, nonce)
            self._stop_process(machine)
            self._set_state(machine, "stopped")
            self._event(machine, "stop", "stopped", source="user")
            return 200, {"ok": True}
        if action == "restart" and method == "POST":
            self._require_lease(machine, nonce)
            self._launch(machine)
            return 200, {"ok": True}
        if action == "wait" and method == "GET":
            return self._wait(machine, query)
        if action == "lease":
            return self._lease(method, machine=machine, query=query, nonce=nonce, body=body)
        if action == "events" and method == "GET":
            limit = min(int(_first(query, "limit") or 20), 50)
            return 200, copy.deepcopy(machine.events[:limit])
        raise _HttpError(404, f"no route for {method} machines/{action}")

    def _list_machines(self, app: _App, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        include_deleted = _first(query, "include_deleted") == "true"
        states = {s for v in query.get("state", []) for s in v.split(",") if s}
        region = _first(query, "region")
        wanted_meta = {
            k[len("metadata.") :]: v[0] for k, v in query.items() if k.startswith("metadata.")
        }
        result = []
        for machine in app.machines.values():
            if machine.state == "destroyed" and not include_deleted:
                continue
            if (states and machine.state not in states) or (region and machine.region != region):
                continue
            metadata = machine.config.get("metadata") or {}
            if any(metadata.get(k) != v for k, v in wanted_meta.items()):
                continue
            result.append(self._machine_json(machine))
        return result

    def _validated_request(self, app: _App, body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if not isinstance(body, dict):
            raise _HttpError(400, "request body must be a JSON object")
        config = body.get("config")
        if not isinstance(config, dict) or not config.get("image"):
            raise _HttpError(400, "config.image is required")
        self._check_secrets_version(app, body)
        return body, config

    def _create_machine(self, app: _App, body: Any) -> dict[str, Any]:
        body, config = self._validated_request(app, body)
        name = body.get("name")
        if name and any(m.name == name for m in app.machines.values() if m.state != "destroyed"):
            raise _HttpError(409, f"machine name {name} is already in use")
        machine = self._new_machine(app, config, str(body.get("region") or "cdg"), name)
        if not body.get("skip_launch"):
            self._launch(machine)
        result = self._machine_json(machine)
        ttl = body.get("lease_ttl")
        if isinstance(ttl, int) and ttl > 0:
            machine.lease = _Lease(
                secrets.token_hex(16), time.time() + ttl, "creator", "", machine.instance_id
            )
            result["nonce"] = machine.lease.nonce
        return result

    def _update_machine(
        self, app: _App, machine: _Machine, body: Any, nonce: str | None
    ) -> dict[str, Any]:
        body, config = self._validated_request(app, body)
        region, name = body.get("region"), body.get("name")
        if region and region != machine.region:
            raise _HttpError(400, "region cannot be changed on update")
        if name and name != machine.name:
            raise _HttpError(400, "name cannot be changed on update")
        current = body.get("current_version")
        if current and current != machine.instance_id:
            raise _HttpError(412, f"machine version {machine.instance_id} is not {current}")
        self._require_lease(machine, nonce)
        was = machine.state
        machine.config = copy.deepcopy(config)
        machine.instance_id = _ulid()
        machine.updated_at = _now_iso()
        skip = bool(body.get("skip_launch"))
        lease = self._lease_of(machine)
        app.updates.append(
            UpdateWindow(
                machine.id,
                machine.instance_id,
                skip,
                time.monotonic(),
                lease.nonce if lease else None,
            )
        )
        self._event(machine, "update", "replacing", source="user")
        if skip:
            # fly-api.md 3.5: with skip_launch the new version stays "created".
            self._stop_process(machine)
            if was in _RUNNING:
                self._event(machine, "stop", "stopped")
            self._set_state(machine, "created")
        else:
            self._launch(machine)
        self._settle_updates(machine)
        return self._machine_json(machine)

    def _wait(self, machine: _Machine, query: dict[str, list[str]]) -> tuple[int, Any]:
        states = {s for v in query.get("state", ["started"]) for s in v.split(",") if s}
        version = _first(query, "version") or _first(query, "instance_id")
        raw_timeout = _first(query, "timeout") or str(_MAX_WAIT)
        timeout = _parse_duration(raw_timeout, -1)
        if timeout < 0 or timeout > _MAX_WAIT:
            raise _HttpError(400, f"timeout must be between 0 and {_MAX_WAIT} seconds")
        deadline = time.monotonic() + timeout

        def reached() -> bool:
            return machine.state in states and (not version or machine.instance_id == version)

        while not reached():
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                wanted = ",".join(sorted(states))
                raise _HttpError(
                    408,
                    f"machine failed to reach desired state, {wanted}, currently {machine.state}",
                )
            self._changed.wait(min(left, 0.5))
        event_id = machine.events[0]["id"] if machine.events else ""
        return 200, {
            "ok": True,
            "state": machine.state,
            "version": machine.instance_id,
            "event_id": event_id,
        }

    def _lease(
        self,
        method: str,
        *,
        machine: _Machine,
        query: dict[str, list[str]],
        nonce: str | None,
        body: Any,
    ) -> tuple[int, Any]:
        lease = self._lease_of(machine)
        if method == "GET":
            if lease is None:
                raise _HttpError(404, "lease not found")
            return 200, {"status": "success", "data": _lease_json(lease)}
        if method == "DELETE":
            if not nonce:
                raise _HttpError(400, f"{_LEASE_HEADER} header is required")
            if lease is None:
                raise _HttpError(404, "lease not found")
            if lease.nonce != nonce:
                raise _HttpError(409, f"lease currently held by {lease.owner}")
            self._lease_ended(machine)
            return 200, {}
        if method != "POST":
            raise _HttpError(405, "method not allowed")
        # The spec puts ttl in the body, fly-go in the query: accept either.
        ttl_value = (body or {}).get("ttl") if isinstance(body, dict) else None
        ttl = int(ttl_value or _first(query, "ttl") or 30)
        description = str((body or {}).get("description", "")) if isinstance(body, dict) else ""
        if lease is not None and lease.nonce != nonce:
            raise _HttpError(409, f"machine {machine.id} lease currently held by {lease.owner}")
        if lease is not None:
            lease.expires_at = time.time() + ttl
        else:
            lease = _Lease(
                secrets.token_hex(16),
                time.time() + ttl,
                "emulator@fly.local",
                description,
                machine.instance_id,
            )
            machine.lease = lease
        return 201, {"status": "success", "data": _lease_json(lease)}


def _lease_json(lease: _Lease) -> dict[str, Any]:
    return {
        "nonce": lease.nonce,
        "expires_at": int(lease.expires_at),
        "owner": lease.owner,
        "description": lease.description,
        "version": lease.version,
    }


def _first(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _err(message: str, code: str) -> dict[str, str]:
    return {"error": message, "status": code}


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, timeout=5)


class _FrontProxy:
    """A loopback TCP listener that pipes each connection to a backend port chosen per
    connection; a connection with no started backend is closed at once."""

    def __init__(self, pick: Callable[[], int | None]) -> None:
        self._pick = pick
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        port = self._pick()
        try:
            backend = socket.create_connection(("127.0.0.1", port), timeout=5) if port else None
        except OSError:
            backend = None
        if backend is None:
            client.close()
            return
        backend.settimeout(None)
        with self._lock:
            self._open.update({client, backend})
        pump = threading.Thread(target=self._pump, args=(backend, client), daemon=True)
        pump.start()
        self._pump(client, backend)
        pump.join()
        with self._lock:
            self._open.difference_update({client, backend})
        for sock in (client, backend):
            with contextlib.suppress(OSError):
                sock.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class _Handler(BaseHTTPRequestHandler):
    owner: FlyApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: ``FlyApi.request_log`` holds what tests need."""

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        status, payload, extra = self.owner.handle(self.command, self.path, headers, raw)
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("fly-request-id", secrets.token_hex(8))
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()
