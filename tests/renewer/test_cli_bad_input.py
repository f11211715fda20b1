"""Bad input through the real CLI (issue 5, "Bad input").

Each case runs ``python -m renewer`` as a subprocess and must end with exit 2 and a
message on stderr naming the field, with no network call (every URL and endpoint points
at a loopback socket owned by the case, which counts connections) and nothing written
but the ``--report-json`` that records a config failure. Wall times are recorded and
printed as a summary; speed is measured here, not asserted.

The cases run two at a time (each has its own listener and folder) before the
assertions, so the module stays fast; the per-case unit checks live in test_config.py.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import pytest

# Generous: a hanging CLI must fail its test, not the whole suite.
SUBPROCESS_TIMEOUT = 20.0
REPORT = "report.json"
CONFIG = "config.json"
WORKERS = max(1, min(2, os.cpu_count() or 1))


class CountingListener:
    """A loopback TCP socket that accepts, records and drops every connection."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.02)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            conn.close()  # a probe or HTTP call then fails at once instead of hanging

    def __enter__(self) -> CountingListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # A connection the kernel completed after the last accept still counts.
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            self.connections += 1
            conn.close()
        self.sock.close()


def good_config(port: int) -> dict[str, Any]:
    """A valid config whose every network address is the case's counting listener."""
    base = f"http://127.0.0.1:{port}"
    return {
        "acme": {"directory": f"{base}/dir"},
        "dns": {"api_base_url": f"{base}/client/v4"},
        "renewal": {"ari": True},
        "certificates": [
            {
                "name": "smtp",
                "domains": ["smtp.example.com", "mx.example.com"],
                "endpoints": [f"127.0.0.1:{port}", f"127.0.0.1:{port}/tls"],
                "targets": [
                    {"type": "fly", "app": "example-smtp", "api_base_url": base},
                    {"type": "dotenv", "path": "smtp.env", "reload_command": ["true"]},
                ],
            }
        ],
        "notify": {
            "from": "certs@example.com",
            "to": "ops@example.com",
            "api_base_url": f"{base}/api/v1",
        },
    }


GOOD_ENV = {
    "CLOUDFLARE_API_TOKEN": "cf-test-token-0001",
    "FLY_API_TOKEN": "FlyV1 fm2_test0001",
    "MAILPACE_TOKEN": "mp-test-token-0001",
}

Config = dict[str, Any]
Mutation = Callable[[Config], None]
# What a case prepares in the working directory before the run (symlinks, files).
Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    field: str  # must appear in stderr (and in the report's error message)
    mutate: Mutation | None = None  # applied to good_config(); None: the good config
    raw: bytes | None = None  # the exact config bytes (instead of a mutation)
    via: str = "file"  # file | env (RENEWER_CONFIG) | none | missing-file | directory
    env: dict[str, str] = dc_field(default_factory=lambda: dict(GOOD_ENV))
    args: tuple[str, ...] = ("run",)
    extra_args: tuple[str, ...] = ()
    setup: Setup | None = None
    usage_error: bool = False  # argparse rejects it: no report file is written


def _cert(config: Config) -> dict[str, Any]:
    cert: dict[str, Any] = config["certificates"][0]
    return cert


def set_cert(key: str, value: object) -> Mutation:
    return lambda c: _cert(c).__setitem__(key, value)


def set_target(i: int, key: str, value: object) -> Mutation:
    return lambda c: _cert(c)["targets"][i].__setitem__(key, value)


def set_section(section: str, key: str, value: object) -> Mutation:
    return lambda c: c.setdefault(section, {}).__setitem__(key, value)


def replace(key: str, value: object) -> Mutation:
    return lambda c: c.__setitem__(key, value)


def add_cert(cert: dict[str, Any]) -> Mutation:
    return lambda c: c["certificates"].append(copy.deepcopy(cert))


def symlinked_dotenv(cwd: Path) -> None:
    (cwd / "smtp.env").symlink_to(cwd.parent / "outside.env")


def symlinked_folder(cwd: Path) -> None:
    outside = cwd.parent / "outside"
    outside.mkdir()
    (cwd / "conf").symlink_to(outside, target_is_directory=True)


def garbage_ca_bundle(cwd: Path) -> None:
    (cwd / "ca.pem").write_text("this is not a certificate\n")


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in GOOD_ENV.items() if k not in names}


RFC2136_TSIG = {"provider": "rfc2136", "server": "127.0.0.1:53", "tsig_name": "renewer"}
T0, T1 = 0, 1  # the fly and the dotenv target of good_config
F = "certificates[0]"

CASES: list[Case] = [
    # --- hostile names
    Case("cert-name-space", f"{F}.name", set_cert("name", "my smtp")),
    Case("cert-name-newline", f"{F}.name", set_cert("name", "smtp\nSubject: pwned")),
    Case("cert-name-shell", f"{F}.name", set_cert("name", "smtp;rm -rf ~")),
    Case("cert-name-subshell", f"{F}.name", set_cert("name", "$(touch pwned)")),
    Case("cert-name-huge", f"{F}.name", set_cert("name", "x" * 200_000)),
    Case(
        "cert-name-duplicate",
        "certificates[1].name",
        add_cert({"name": "smtp", "domains": ["other.example.com"]}),
    ),
    Case("domain-space", f"{F}.domains[1]", set_cert("domains", ["smtp.example.com", "mx ex.com"])),
    Case("domain-newline", f"{F}.domains[0]", set_cert("domains", ["smtp.example.com\r\n"])),
    Case("domain-shell", f"{F}.domains[0]", set_cert("domains", ["`id`.example.com"])),
    Case("domain-wildcard-middle", f"{F}.domains[0]", set_cert("domains", ["a.*.example.com"])),
    Case("domain-wildcard-tld", f"{F}.domains[0]", set_cert("domains", ["*.com"])),
    Case(
        "domain-duplicate-idn",
        f"{F}.domains[1]",
        set_cert("domains", ["bücher.example", "xn--bcher-kva.example"]),
    ),
    Case(
        "domain-duplicate-across",
        "certificates[1].domains[0]",
        add_cert({"name": "b", "domains": ["MX.example.com."]}),
    ),
    Case("domain-huge", f"{F}.domains[0]", set_cert("domains", ["a" * 100_000 + ".com"])),
    Case(
        "domains-too-many",
        f"{F}.domains",
        set_cert("domains", [f"h{i}.example.com" for i in range(500)]),
    ),
    Case("endpoint-shell", f"{F}.endpoints[0]", set_cert("endpoints", ["a|nc evil 1:25"])),
    # --- targets
    Case(
        "reload-command-string",
        f"{F}.targets[1].reload_command",
        set_target(T1, "reload_command", "systemctl reload smtp"),
    ),
    Case(
        "reload-command-nested",
        f"{F}.targets[1].reload_command[1]",
        set_target(T1, "reload_command", ["kill", ["-HUP"]]),
    ),
    Case(
        "dotenv-path-absolute",
        f"{F}.targets[1].path",
        set_target(T1, "path", "/tmp/renewer-bad-input.env"),
    ),
    Case("dotenv-path-outside", f"{F}.targets[1].path", set_target(T1, "path", "../smtp.env")),
    Case("dotenv-path-symlink", f"{F}.targets[1].path", setup=symlinked_dotenv),
    Case(
        "dotenv-folder-symlink",
        f"{F}.targets[1].path",
        set_target(T1, "path", "conf/smtp.env"),
        setup=symlinked_folder,
    ),
    Case("dotenv-var-metachar", f"{F}.targets[1].key_var", set_target(T1, "key_var", "K$(id)")),
    Case("fly-app-metachar", f"{F}.targets[0].app", set_target(T0, "app", "smtp app;id")),
    # --- other sections
    Case("unknown-top-level-key", "notfy", replace("notfy", {})),
    Case("no-certificates", "certificates", replace("certificates", [])),
    Case(
        "dns-url-remote-http",
        "dns.api_base_url",
        set_section("dns", "api_base_url", "http://api.cloudflare.com/client/v4"),
    ),
    Case("before-days-huge", "renewal.before_days", set_section("renewal", "before_days", 10**30)),
    Case(
        "notify-from-injection",
        "notify.from",
        set_section("notify", "from", "certs@example.com\nBcc: all@example.com"),
    ),
    Case(
        "ca-bundle-not-pem",
        "acme.ca_bundle",
        set_section("acme", "ca_bundle", "ca.pem"),
        setup=garbage_ca_bundle,
    ),
    # --- the config source itself
    Case("file-invalid-json", "--config", raw=b'{"certificates": [}'),
    Case("file-not-an-object", "config", raw=b'["smtp.example.com"]'),
    Case("file-huge", "--config", raw=b'{"x": "' + b"a" * 1_100_000 + b'"}'),
    Case("file-missing", "--config", via="missing-file"),
    Case("file-is-a-directory", "--config", via="directory"),
    Case("env-invalid-json", "RENEWER_CONFIG", raw=b"{'certificates': []}", via="env"),
    Case("env-bad-field", f"{F}.name", set_cert("name", "a b"), via="env"),
    Case("no-config-at-all", "--config", via="none"),
    # --- environment (secrets)
    Case(
        "cloudflare-token-missing", "CLOUDFLARE_API_TOKEN", env=env_without("CLOUDFLARE_API_TOKEN")
    ),
    Case("fly-token-missing", "FLY_API_TOKEN", env={**GOOD_ENV, "FLY_API_TOKEN": " "}),
    Case("mailpace-token-missing", "MAILPACE_TOKEN", env=env_without("MAILPACE_TOKEN")),
    Case("tsig-secret-missing", "RFC2136_TSIG_SECRET", replace("dns", RFC2136_TSIG)),
    # --- the same through `check`, `--force` and `--dry-run`
    Case("check-bad-name", f"{F}.name", set_cert("name", "a b"), args=("check",)),
    Case(
        "force-bad-domain",
        f"{F}.domains[0]",
        set_cert("domains", ["smtp.example.com;id"]),
        extra_args=("--force",),
    ),
    Case(
        "dry-run-bad-reload",
        f"{F}.targets[1].reload_command",
        set_target(T1, "reload_command", "true"),
        extra_args=("--dry-run",),
    ),
    # --- invocations
    Case("unknown-subcommand", "command", args=("renew",), usage_error=True),
    Case("no-subcommand", "command", args=(), usage_error=True),
    Case("unknown-flag", "--frce", extra_args=("--frce",), usage_error=True),
    Case(
        "flag-of-another-command",
        "--force",
        args=("check",),
        extra_args=("--force",),
        usage_error=True,
    ),
    Case(
        "config-without-value",
        "--config",
        via="none",
        extra_args=("--config",),
        usage_error=True,
    ),
]

BUG_CASES: list[tuple[Case, str]] = [
    (
        Case(
            "acme-account-key-garbage",
            "ACME_ACCOUNT_KEY",
            env={**GOOD_ENV, "ACME_ACCOUNT_KEY": "not a key"},
        ),
        "bug: ACME_ACCOUNT_KEY is parsed only when the first order starts "
        "(services.Services.account_key), after the endpoints were probed; its ConfigError "
        "is then caught per certificate in run.renew_certificate and the run exits 1",
    ),
    (
        Case(
            "report-json-folder-missing",
            f"{F}.name",
            set_cert("name", "a b"),
            extra_args=("--report-json", "missing/report.json"),
        ),
        "bug: __main__.main writes --report-json inside `except ConfigError` without "
        "catching OSError, so an unwritable report path turns exit 2 into a traceback (exit 1)",
    ),
    (
        Case("file-not-utf8", "--config", raw=b'\xff\xfe{"certificates": []}'),
        "bug: config.read_config_source does not catch UnicodeDecodeError (traceback, exit 1)",
    ),
]

CONTROL = Case("good-config-check (control)", "", args=("check",))


@dataclass
class Outcome:
    case: Case
    cwd: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    connections: int
    files: set[str]


def run_case(case: Case, cwd: Path) -> Outcome:
    """Runs the CLI for one case in ``cwd``, against a fresh counting listener."""
    with CountingListener() as listener:
        config: Config = good_config(listener.port)
        if case.mutate is not None:
            case.mutate(config)
        text = case.raw if case.raw is not None else json.dumps(config).encode()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "LANG": "C.UTF-8"}
        env.update(case.env)
        args = [*case.args]
        if case.args in (("run",), ("check",)):
            args += ["--report-json", REPORT]
            if case.via == "file":
                (cwd / CONFIG).write_bytes(text)
                args += ["--config", CONFIG]
            elif case.via == "env":
                env["RENEWER_CONFIG"] = text.decode()
            elif case.via == "missing-file":
                args += ["--config", "missing.json"]
            elif case.via == "directory":
                (cwd / "conf.d").mkdir()
                args += ["--config", "conf.d"]
        args += case.extra_args
        if case.setup is not None:
            case.setup(cwd)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "renewer", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
        )
        seconds = time.monotonic() - started
    return Outcome(
        case,
        cwd,
        done.returncode,
        done.stdout,
        done.stderr,
        seconds,
        listener.connections,
        {p.name for p in cwd.iterdir()},
    )


def _summary(outcomes: list[Outcome]) -> list[str]:
    rows = sorted(outcomes, key=lambda o: -o.seconds)
    total = sum(o.seconds for o in rows)
    over = sum(o.seconds > 1.0 for o in rows)
    lines = [
        "",
        f"CLI bad input: {len(rows)} runs ({WORKERS} at a time), {total:.1f}s of runs, "
        f"median {rows[len(rows) // 2].seconds:.2f}s, slowest {rows[0].seconds:.2f}s "
        f"({rows[0].case.id}), over 1 s: {over}",
    ]
    lines += [f"  {o.seconds:5.2f}s exit {o.returncode}  {o.case.id}" for o in rows[:5]]
    return lines


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Outcome]:
    """Runs every case once, a few at a time, and prints the timing summary."""
    cases = [*CASES, *(c for c, _ in BUG_CASES), CONTROL]

    def one(case: Case) -> Outcome:
        cwd = tmp_path_factory.mktemp("cli-bad-input") / "work"
        cwd.mkdir()
        return run_case(case, cwd)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = list(pool.map(one, cases))
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            for line in _summary(results):
                reporter.write_line(line)
    return {o.case.id: o for o in results}


def _check_rejected(outcome: Outcome) -> None:
    case, cwd = outcome.case, outcome.cwd
    shown = f"exit {outcome.returncode}\nstderr: {outcome.stderr[-2000:]}"
    assert outcome.returncode == 2, shown
    assert "Traceback" not in outcome.stderr, shown
    assert case.field in outcome.stderr, shown
    if case.usage_error:
        assert "usage error" in outcome.stderr, shown
    else:
        assert f"configuration error: {case.field}" in outcome.stderr, shown
    assert outcome.connections == 0, "the run made a network call"
    # Nothing written: no dotenv file (nor through a symlink), the report is the only new file.
    if case.setup is symlinked_dotenv:
        assert (cwd / "smtp.env").is_symlink()
        assert not (cwd.parent / "outside.env").exists(), "wrote through the symlink"
    else:
        assert "smtp.env" not in outcome.files
    outside = cwd.parent / "outside"
    assert not outside.exists() or not any(outside.iterdir()), "wrote through the symlink"
    for secret in GOOD_ENV.values():
        assert secret not in outcome.stderr + outcome.stdout
    written = outcome.files - {CONFIG, "conf.d", "conf", "ca.pem", "smtp.env"}
    if case.usage_error:
        assert written == set()
        return
    assert written == {REPORT}
    report = json.loads((cwd / REPORT).read_text())
    assert report["status"] == "failed"
    assert report["certificates"] == []
    assert report["error"]["step"] == "config"
    assert case.field in report["error"]["message"]


@pytest.mark.integration
@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input_is_rejected(case_id: str, outcomes: dict[str, Outcome]) -> None:
    _check_rejected(outcomes[case_id])


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.integration
def test_good_config_reaches_the_network(outcomes: dict[str, Outcome]) -> None:
    """Negative control: the base config is valid, and the listener does see a run's calls."""
    outcome = outcomes[CONTROL.id]
    # Both endpoints hang up at once: `check` reports problems (exit 1), not a config error.
    assert outcome.returncode == 1, outcome.stderr[-2000:]
    assert "configuration error" not in outcome.stderr
    assert outcome.connections >= 2
    assert json.loads((outcome.cwd / REPORT).read_text())["status"] == "problems"


@pytest.mark.integration
@pytest.mark.parametrize(
    "case_id",
    [pytest.param(c.id, id=c.id) for c, _found in BUG_CASES],
)
def test_bad_input_found_by_this_suite(case_id: str, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case_id]
    if case_id == "report-json-folder-missing":
        # The report's folder is missing on purpose: exit 2 all the same, nothing written.
        assert outcome.returncode == 2, outcome.stderr[-2000:]
        assert "Traceback" not in outcome.stderr
        # Checked before the config, so the missing folder is what is named.
        assert "--report-json" in outcome.stderr
        assert outcome.files == {CONFIG}
        return
    _check_rejected(outcome)
