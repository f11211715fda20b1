"""The hardening suite's plumbing: loopback worlds, the job run as a real process, and a
leak scan over everything each test's runs printed, reported and emailed.

Every run goes through ``Runs`` so that nothing the job says escapes the secret scan:
after each test, ``leak_guard`` scans the captured stdout/stderr, JSON reports and sink
emails against every secret of the worlds the test started (leakscan.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from emulators.world import SUBMISSION_APP, LocalWorld, WorldOptions
from renewer.certs import fingerprint_sha256, load_roots, verify_chain
from renewer.probe import Endpoint, ServedCertificate, probe_endpoint
from tests.hardening.leakscan import Needles, needles_for_world, scan

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120.0  # seconds; a run that hangs fails the test instead of CI


@dataclass
class CliResult:
    """One finished ``python -m renewer`` process."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float
    report: dict[str, Any] | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def cert(self, name: str) -> dict[str, Any]:
        assert self.report is not None, self.output[-3000:]
        for cert in self.report["certificates"]:
            if cert["name"] == name:
                return dict(cert)
        raise AssertionError(f"no certificate {name} in report: {self.report}")


@dataclass
class Runs:
    """Starts worlds and job processes for one test and keeps every output for the scan."""

    root: Path
    stack: ExitStack
    worlds: list[LocalWorld] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (where, text)
    extra_needles: list[Needles] = field(default_factory=list)
    spawned: list[Spawned] = field(default_factory=list)
    _count: int = 0

    def world(self, **options: Any) -> LocalWorld:
        """A started LocalWorld (fast machines: short smoke check) closed after the test."""
        options.setdefault("smoke_check", 0.3)
        workdir = self.root / f"world{len(self.worlds)}"
        world = self.stack.enter_context(LocalWorld(workdir, WorldOptions(**options)))
        self.worlds.append(world)
        return world

    def env(self, world: LocalWorld, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            **world.env(),
            **extra,
        }

    def _argv(self, command: str, config: Path, args: tuple[str, ...]) -> tuple[list[str], Path]:
        self._count += 1
        report = config.parent / f"report-{self._count}.json"
        argv = [sys.executable, "-m", "renewer", command, "--config", str(config)]
        return [*argv, *args, "--report-json", str(report)], report

    def cli(
        self,
        world: LocalWorld,
        command: str,
        *args: str,
        config: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = RUN_TIMEOUT,
    ) -> CliResult:
        """Runs ``python -m renewer <command> --config ... <args>`` to the end."""
        config = config or world.workdir / "renewer.json"
        if not config.exists():
            world.write_config(config.name)
        argv, report_path = self._argv(command, config, args)
        started = time.monotonic()
        done = subprocess.run(
            argv,
            cwd=world.workdir,
            env=env or self.env(world),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        seconds = time.monotonic() - started
        report = _read_json(report_path)
        self.keep(f"{command} #{self._count} stdout", done.stdout)
        self.keep(f"{command} #{self._count} stderr", done.stderr)
        if report is not None:
            self.keep(f"{command} #{self._count} report", json.dumps(report))
        # The keys this run deployed; a later run replaces them, so take them now.
        self.extra_needles.append(needles_for_world(world))
        return CliResult(tuple(argv), done.returncode, done.stdout, done.stderr, seconds, report)

    def run(self, world: LocalWorld, *args: str, **kwargs: Any) -> CliResult:
        return self.cli(world, "run", *args, **kwargs)

    def spawn(self, world: LocalWorld, *args: str) -> Spawned:
        """Starts ``renewer run`` without waiting (for the SIGKILL tests)."""
        config = world.workdir / "renewer.json"
        if not config.exists():
            world.write_config()
        argv, _ = self._argv("run", config, args)
        log_path = world.workdir / f"spawned-{self._count}.log"
        log = log_path.open("wb")
        self.stack.callback(log.close)
        process = subprocess.Popen(
            argv, cwd=world.workdir, env=self.env(world), stdout=log, stderr=subprocess.STDOUT
        )
        spawned = Spawned(process, log_path)
        self.stack.callback(spawned.kill)
        self.spawned.append(spawned)
        return spawned

    def keep(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def all_texts(self) -> list[tuple[str, str]]:
        """Everything captured plus what the worlds' MailPace sinks received."""
        texts = list(self.texts)
        for spawned in self.spawned:
            spawned.kill()
            texts.append((f"spawned run {spawned.log_path.name}", spawned.text()))
        for index, world in enumerate(self.worlds):
            if world.mailpace is None:
                continue
            for number, message in enumerate(world.mailpace.messages):
                texts.append((f"world{index} email {number}", repr(message)))
        return texts


@dataclass
class Spawned:
    process: subprocess.Popen[bytes]
    log_path: Path

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Polls ``predicate`` until true; fails if the process exits first or time runs out."""
        started = time.monotonic()
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the run exited ({self.process.returncode}) before {what}:\n"
                    + self.text()[-3000:]
                )
            if time.monotonic() - started > timeout:
                raise AssertionError(f"timed out waiting for {what}:\n" + self.text()[-3000:])
            time.sleep(0.02)
        return time.monotonic() - started


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    """Worlds and runs for one test; after it, every output is scanned for secrets."""
    with ExitStack() as stack:
        recorder = Runs(tmp_path, stack)
        yield recorder
        # Collect the private keys the runs produced while the worlds still run.
        needles = [needles_for_world(world) for world in recorder.worlds]
        needles += recorder.extra_needles
        texts = recorder.all_texts()
    findings = scan(texts, needles)
    assert not findings, "secret material in the job's output:\n" + "\n".join(
        str(f) for f in findings
    )


def print_figures(title: str, **figures: object) -> None:
    """The suite's figures (retries, seconds to give up), shown with ``pytest -s`` and in
    the captured output of a failing test."""
    shown = ", ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    sys.stdout.write(f"\n[hardening] {title}: {shown}\n")


def fly_submission_config(world: LocalWorld, wait_timeout: float = 3.0) -> Path:
    """The world's config with only the submission certificate (two machines behind one
    front per port), so the decision sees each machine once and a machine left behind
    shows up; ``wait_timeout`` short so a stuck machine fails fast."""
    config = world.config()
    config["certificates"] = [c for c in config["certificates"] if c["name"] == "submission"]
    config["certificates"][0]["targets"][0]["wait_timeout"] = wait_timeout
    path = world.workdir / "renewer.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def machines_serving(world: LocalWorld) -> dict[str, ServedCertificate | None]:
    """What each submission machine serves on its own host port (None: not running)."""
    assert world.fly is not None
    served: dict[str, ServedCertificate | None] = {}
    for machine_id in world.fly.machine_ids(SUBMISSION_APP):
        view = world.fly.machine(SUBMISSION_APP, machine_id)
        port = view.host_ports.get(587)
        if port is None or view.state != "started":
            served[machine_id] = None
            continue
        endpoint = Endpoint.parse(f"127.0.0.1:{port}/starttls")
        served[machine_id] = probe_endpoint(endpoint, "smtp.example.test", timeout=5)
    return served


def fingerprints_served(world: LocalWorld) -> set[str | None]:
    return {
        None if s is None else fingerprint_sha256(s.leaf) for s in machines_serving(world).values()
    }


def assert_every_machine_serves_a_valid_certificate(world: LocalWorld) -> set[str]:
    """Each machine is up and serves a certificate that verifies to the test CA for every
    configured name, now; returns the fingerprints seen."""
    roots = load_roots(world.pebble.ca_bundle)
    seen = set()
    for machine_id, served in machines_serving(world).items():
        assert served is not None, f"machine {machine_id} serves nothing"
        for name in ("smtp.example.test", "submission.example.test"):
            verify_chain(
                served.leaf,
                served.chain,
                roots,
                now=datetime.now(UTC),
                use_system_roots=False,
                name=name,
            )
        seen.add(fingerprint_sha256(served.leaf))
    return seen
