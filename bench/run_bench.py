"""Benchmark of issue 6: cert-renewer next to lego, certbot and a minimal ``acme`` script.

Starts Pebble 2.10 (validation sleep off, authorization reuse 0, no Retry-After header
unless ``--retry-after``) and BIND 9 (TSIG-signed RFC 2136 updates, query log on) on
loopback, then times for each client a fresh issuance of: one certificate with 1 name,
one with 5 names, and 20 certificates of one name each. Runs alternate between clients.

Each measurement is a fresh child process (or, for lego and certbot with 20 certificates,
20 of them one after another), reaped with ``os.wait4`` so that its CPU time (user + sys)
and peak RSS belong to that client alone. Also measured:
- start-up: process start -> first TCP connection to the ACME server. All ACME traffic
  goes through a small TCP relay in this process that notes when connections arrive.
- propagation detection: BIND's log time of the TXT update -> the CA's first lookup of
  that name (Pebble validates at once when the challenge is answered, so this is "record
  served -> challenge answered"; BIND's query log tells the CA's lookups from the
  client's own checks, see ``propagation_delays``).

Use ``bench/run`` (sets everything up); this script expects the tools to exist.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from emulators.bind import BindServer, generate_tsig_secret
from emulators.pebble import PebbleServer

REPO = Path(__file__).resolve().parents[1]
ZONE = "example.com"
TSIG_NAME = "bench-key"
CLIENTS = ("ours", "minimal", "certbot", "lego")
# scenario -> (certificates, names per certificate)
SCENARIOS: Mapping[str, tuple[int, int]] = {
    "1name": (1, 1),
    "5names": (1, 5),
    "20certs": (20, 1),
}
SCENARIO_LABELS = {"1name": "1 name", "5names": "5 names", "20certs": "20 certificates"}
CHILD_TIMEOUT = 600.0


@dataclass
class Sample:
    """One measurement of one client on one scenario."""

    wall: float  # seconds
    cpu: float  # user + sys seconds of the child process(es)
    rss_mb: float  # peak RSS of the largest child, MiB
    ok: bool = True
    startup: float | None = None  # process start -> first ACME connection, seconds
    propagation: list[float] = field(default_factory=list)  # per name, seconds


@dataclass
class ChildResult:
    wall: float
    cpu: float
    rss_kb: int
    returncode: int
    started: float  # time.monotonic() just before the child was started


def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    timeout: float = CHILD_TIMEOUT,
) -> ChildResult:
    """Runs one process and reaps it with wait4: its own CPU time and peak RSS."""
    with log.open("ab") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
        timer = threading.Timer(timeout, lambda: os.kill(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildResult(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        rss_kb=usage.ru_maxrss,
        returncode=proc.returncode,
        started=started,
    )


# ---------------------------------------------------------------- ACME relay (start-up)


class TcpRelay:
    """Forwards 127.0.0.1:port to the ACME server and notes when each connection arrives.

    TLS passes through untouched (Pebble's certificate names 127.0.0.1, whatever the
    port), and Pebble builds its URLs from the Host header, so clients stay on the relay.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.accepts: list[float] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)

    def __enter__(self) -> TcpRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._sock.close()
        self._thread.join(timeout=2)

    def first_accept_after(self, started: float) -> float | None:
        later = [t for t in list(self.accepts) if t >= started]
        return min(later) - started if later else None

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepts.append(time.monotonic())
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        for sock in (conn, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, conn), daemon=True)
        back.start()
        _pump(conn, upstream)
        back.join()
        conn.close()
        upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------- BIND query log

# named -g writes e.g. "22-Oct-2026 10:00:00.123 client @0x.. 127.0.0.1#5353/key bench-key:
# updating zone 'example.com/IN': adding an RR at '_acme-challenge.a.example.com' TXT "v""
_TIME = r"(?P<time>\d{2}-\w{3}-\d{4} \d{2}:\d{2}:\d{2}\.\d{3})"
_ADD_RE = re.compile(_TIME + r".*adding an RR at '(?P<name>[^']+)' TXT")
_QUERY_RE = re.compile(_TIME + r".*query: (?P<name>\S+) IN TXT (?P<flags>\S+)")


def _log_time(text: str) -> datetime:
    return datetime.strptime(text, "%d-%b-%Y %H:%M:%S.%f")


def propagation_delays(log_text: str) -> dict[str, float]:
    """Per challenge name: BIND's TXT update -> the CA's first lookup after it.

    Pebble 2.10's VA asks over TCP with recursion desired (flags ``+T``, three lookups at
    once); clients that check propagation themselves ask over UDP (ours without RD:
    ``-``; lego through --dns.resolvers: ``+E(0)``). Ours reads stale records over TCP
    too, but before it adds the new one, so those lookups come before the update.
    """
    added: dict[str, datetime] = {}
    delays: dict[str, float] = {}
    for line in log_text.splitlines():
        match = _ADD_RE.search(line)
        if match:
            added.setdefault(match["name"].lower().rstrip("."), _log_time(match["time"]))
            continue
        match = _QUERY_RE.search(line)
        if match and match["flags"].startswith("+") and "T" in match["flags"]:
            name = match["name"].lower().rstrip(".")
            if name in added and name not in delays:
                delays[name] = (_log_time(match["time"]) - added[name]).total_seconds()
    return delays


class QueryLoggingBind(BindServer):
    """BIND 9 from emulators.bind with ``querylog yes`` (``named -g`` logs it to its log)."""

    def _named_conf(self) -> str:
        conf = super()._named_conf()
        return conf.replace("  recursion no;", "  querylog yes;\n  recursion no;", 1)


# ---------------------------------------------------------------- clients


@dataclass
class World:
    """What every client needs to reach the CA and the DNS server."""

    directory: str  # through the relay
    ca_bundle: Path  # Pebble's HTTPS CA + roots
    dns: tuple[str, int]
    tsig_secret: str
    base: Path
    concurrency: int
    lego_propagation: str  # "disable-ans" or a wait such as "0s"


@dataclass
class Job:
    """One client process to run: argv, env, cwd, and what to do before it starts."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    prepare: Callable[[], None] = lambda: None


class Client:
    name = "?"

    def __init__(self, world: World, exe: str | None = None) -> None:
        self.world = world
        self.exe = exe
        self.dir = world.base / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "client.log"

    def base_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
        }

    def jobs(self, tag: str, certs: list[list[str]]) -> list[Job]:
        """The processes that issue ``certs`` (lists of names); ``tag`` is unique per run."""
        raise NotImplementedError


class Ours(Client):
    """``python -m renewer run --force``: RFC 2136, dotenv target, validation included."""

    name = "ours"

    def jobs(self, tag: str, certs: list[list[str]]) -> list[Job]:
        w = self.world
        config = {
            "acme": {
                "directory": w.directory,
                "ca_bundle": str(w.ca_bundle),
                "account_key_file": "account.pem",
            },
            "dns": {
                "provider": "rfc2136",
                "server": f"{w.dns[0]}:{w.dns[1]}",
                "tsig_name": TSIG_NAME,
                "tsig_algorithm": "hmac-sha256",
                "nameservers": [f"{w.dns[0]}:{w.dns[1]}"],
                "propagation_timeout": 60,
            },
            "renewal": {"concurrency": w.concurrency},
            "certificates": [
                {
                    "name": f"{tag}-{i}",
                    "domains": names,
                    "targets": [{"type": "dotenv", "path": f"{tag}-{i}.env"}],
                }
                for i, names in enumerate(certs)
            ],
        }
        path = self.dir / f"{tag}.json"
        path.write_text(json.dumps(config, indent=2))
        env = self.base_env() | {"RFC2136_TSIG_SECRET": w.tsig_secret}
        argv = [sys.executable, "-m", "renewer", "run", "--config", str(path), "--force"]
        argv += ["--report-json", str(self.dir / f"{tag}.report.json")]
        env["PYTHONPATH"] = str(REPO)
        return [Job(argv, env, self.dir)]


class Minimal(Client):
    """bench/minimal_acme.py: the ``acme`` library driven directly, one process."""

    name = "minimal"

    def jobs(self, tag: str, certs: list[list[str]]) -> list[Job]:
        w = self.world
        argv = [sys.executable, str(REPO / "bench" / "minimal_acme.py")]
        argv += ["--directory", w.directory, "--ca-bundle", str(w.ca_bundle)]
        argv += ["--account-key", str(self.dir / "account.pem")]
        argv += ["--dns-server", f"{w.dns[0]}:{w.dns[1]}", "--zone", ZONE]
        argv += ["--tsig-name", TSIG_NAME, "--out", str(self.dir / tag)]
        for names in certs:
            argv += ["--cert", ",".join(names)]
        env = self.base_env() | {"RFC2136_TSIG_SECRET": w.tsig_secret}
        return [Job(argv, env, self.dir)]


class Certbot(Client):
    """certbot certonly with certbot-dns-rfc2136, propagation wait 0, one process per cert."""

    name = "certbot"

    def __init__(self, world: World, exe: str | None = None) -> None:
        super().__init__(world, exe)
        self.credentials = self.dir / "rfc2136.ini"
        self.credentials.write_text(
            f"dns_rfc2136_server = {world.dns[0]}\n"
            f"dns_rfc2136_port = {world.dns[1]}\n"
            f"dns_rfc2136_name = {TSIG_NAME}\n"
            f"dns_rfc2136_secret = {world.tsig_secret}\n"
            "dns_rfc2136_algorithm = HMAC-SHA256\n"
        )
        self.credentials.chmod(0o600)
        self.accounts = self.dir / "accounts-config"  # the warm-up's config dir

    def jobs(self, tag: str, certs: list[list[str]]) -> list[Job]:
        jobs = []
        for i, names in enumerate(certs):
            config = self.dir / tag / f"c{i}"

            def prepare(config: Path = config) -> None:
                # A fresh config dir holding only the account (registered by the warm-up).
                if (self.accounts / "accounts").is_dir():
                    shutil.copytree(self.accounts / "accounts", config / "accounts")

            argv = [str(self.exe), "certonly", "--non-interactive", "--agree-tos"]
            argv += ["--register-unsafely-without-email", "--server", self.world.directory]
            argv += ["--config-dir", str(config), "--work-dir", str(config / "work")]
            argv += ["--logs-dir", str(config / "logs"), "--key-type", "ecdsa"]
            argv += ["--dns-rfc2136", "--dns-rfc2136-credentials", str(self.credentials)]
            argv += ["--dns-rfc2136-propagation-seconds", "0", "--cert-name", f"{tag}-{i}"]
            for name in names:
                argv += ["-d", name]
            env = self.base_env() | {"REQUESTS_CA_BUNDLE": str(self.world.ca_bundle)}
            jobs.append(Job(argv, env, self.dir, prepare))
        return jobs

    def keep_account(self, tag: str) -> None:
        shutil.copytree(self.dir / tag / "c0", self.accounts, dirs_exist_ok=True)


class Lego(Client):
    """lego run with its rfc2136 provider (DNSUPDATE_*), one process per certificate."""

    name = "lego"

    def __init__(self, world: World, exe: str | None = None) -> None:
        super().__init__(world, exe)
        self.accounts = self.dir / "accounts-path"

    def jobs(self, tag: str, certs: list[list[str]]) -> list[Job]:
        w = self.world
        jobs = []
        for i, names in enumerate(certs):
            path = self.dir / tag / f"c{i}"

            def prepare(path: Path = path) -> None:
                if (self.accounts / "accounts").is_dir():
                    shutil.copytree(self.accounts / "accounts", path / "accounts")

            argv = [str(self.exe), "--server", w.directory, "--accept-tos"]
            argv += ["--email", "bench@example.com", "--path", str(path), "--key-type", "ec256"]
            argv += ["--dns", "rfc2136", "--dns.resolvers", f"{w.dns[0]}:{w.dns[1]}"]
            if w.lego_propagation == "disable-ans":
                argv += ["--dns.propagation-disable-ans"]
            else:
                argv += ["--dns.propagation-wait", w.lego_propagation]
            for name in names:
                argv += ["-d", name]
            argv += ["run", "--no-bundle"]
            env = self.base_env() | {
                "LEGO_CA_CERTIFICATES": str(w.ca_bundle),
                "DNSUPDATE_NAMESERVER": f"{w.dns[0]}:{w.dns[1]}",
                "DNSUPDATE_TSIG_KEY": TSIG_NAME,
                "DNSUPDATE_TSIG_SECRET": w.tsig_secret,
                "DNSUPDATE_TSIG_ALGORITHM": "hmac-sha256.",
                "DNSUPDATE_ZONES": ZONE,
                # Whole seconds only ("0.1" falls back to the default 2 s); 1 is the least.
                "DNSUPDATE_POLLING_INTERVAL": "1",
                "DNSUPDATE_PROPAGATION_TIMEOUT": "30",
                "DNSUPDATE_SEQUENCE_INTERVAL": "0",
                "DNSUPDATE_TTL": "60",
            }
            jobs.append(Job(argv, env, self.dir, prepare))
        return jobs

    def keep_account(self, tag: str) -> None:
        shutil.copytree(self.dir / tag / "c0", self.accounts, dirs_exist_ok=True)


# ---------------------------------------------------------------- measuring


def names_for(client: str, tag: str, scenario: str) -> list[list[str]]:
    certs, per_cert = SCENARIOS[scenario]
    return [[f"{client}-{tag}-c{c}-n{n}.{ZONE}" for n in range(per_cert)] for c in range(certs)]


def measure(
    client: Client,
    tag: str,
    certs: list[list[str]],
    relay: TcpRelay | None,
    named_log: Path | None,
) -> Sample:
    offset = named_log.stat().st_size if named_log and named_log.exists() else 0
    wall = cpu = 0.0
    rss = 0
    ok = True
    startup: float | None = None
    for job in client.jobs(tag, certs):
        job.prepare()
        result = run_child(job.argv, env=job.env, cwd=job.cwd, log=client.log)
        wall += result.wall
        cpu += result.cpu
        rss = max(rss, result.rss_kb)
        ok = ok and result.returncode == 0
        if startup is None and relay is not None:
            startup = relay.first_accept_after(result.started)
    delays: list[float] = []
    if named_log is not None:
        with named_log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
        wanted = {f"_acme-challenge.{n}" for names in certs for n in names}
        delays = [d for name, d in propagation_delays(text).items() if name in wanted]
    return Sample(wall, cpu, rss / 1024, ok, startup, delays)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    client: str
    scenario: str
    samples: list[Sample]

    @property
    def wall(self) -> float:
        return median([s.wall for s in self.samples if s.ok])

    @property
    def cpu(self) -> float:
        return median([s.cpu for s in self.samples if s.ok])

    @property
    def rss(self) -> float:
        return max((s.rss_mb for s in self.samples if s.ok), default=float("nan"))

    @property
    def failures(self) -> int:
        return sum(not s.ok for s in self.samples)


def _ratio(value: float, ours: float | None) -> str:
    if ours is None or ours != ours or value != value or ours == 0:
        return "-"
    return f"{value / ours:.2f}x"


def _seconds(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table: median wall, CPU, peak RSS, and each one's ratio to ours."""
    ours = {r.scenario: r for r in rows if r.client == "ours"}
    lines = [
        "| scenario | client | wall (median) | vs ours | CPU user+sys | vs ours "
        "| peak RSS | vs ours | runs ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = ours.get(row.scenario)
        lines.append(
            f"| {SCENARIO_LABELS.get(row.scenario, row.scenario)} | {row.client} "
            f"| {_seconds(row.wall)} | {_ratio(row.wall, base.wall if base else None)} "
            f"| {_seconds(row.cpu)} | {_ratio(row.cpu, base.cpu if base else None)} "
            f"| {row.rss:.0f} MB | {_ratio(row.rss, base.rss if base else None)} "
            f"| {len(row.samples) - row.failures}/{len(row.samples)} |"
        )
    return "\n".join(lines)


def format_extras(rows: Sequence[Row]) -> str:
    """Start-up (first process of each run) and propagation detection, per client."""
    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    head = "| client | start -> first ACME request (median) |"
    head += "".join(
        f" TXT served -> CA lookup, {SCENARIO_LABELS[s]} (median, max) |" for s in scenarios
    )
    lines = [head, "|---|---|" + "---|" * len(scenarios)]
    for client in dict.fromkeys(r.client for r in rows):
        mine = {r.scenario: [s for s in r.samples if s.ok] for r in rows if r.client == client}
        startups = [s.startup for ss in mine.values() for s in ss if s.startup is not None]
        line = f"| {client} | {_seconds(median(startups))} |"
        for scenario in scenarios:
            delays = [d for s in mine.get(scenario, []) for d in s.propagation]
            worst = max(delays) if delays else None
            line += f" {_seconds(median(delays))}, {_seconds(worst)} |"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="cert-renewer next to lego, certbot and a minimal script"
    )
    parser.add_argument("--runs", type=int, default=5, help="runs of the 1- and 5-name cases")
    parser.add_argument("--runs-20", type=int, default=3, help="runs of the 20-certificate case")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"from {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"from {', '.join(CLIENTS)}")
    parser.add_argument("--certbot", default=".bench/venv/bin/certbot")
    parser.add_argument("--lego", default=".bench/lego/usr/bin/lego")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="ours: renewal.concurrency (DESIGN.md default 4; best on 2 cores here)",
    )
    parser.add_argument(
        "--retry-after",
        default="",
        help="Pebble's retryAfter as AUTHZ,ORDER seconds (default: none, no header)",
    )
    parser.add_argument(
        "--lego-propagation",
        default="disable-ans",
        help="'disable-ans' (check via --dns.resolvers) or a wait like 0s",
    )
    parser.add_argument(
        "--profile",
        choices=tuple(SCENARIOS),
        help="afterwards, run ours once more on this case under cProfile and -X importtime",
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and files here")
    parser.add_argument("--json", type=Path, help="also write the samples as JSON here")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.clients = [c for c in args.clients.split(",") if c]
    for s in args.scenarios:
        if s not in SCENARIOS:
            parser.error(f"unknown scenario {s!r}")
    for c in args.clients:
        if c not in CLIENTS:
            parser.error(f"unknown client {c!r}")
    if args.retry_after:
        try:
            authz, order = (int(x) for x in args.retry_after.split(","))
        except ValueError:
            parser.error("--retry-after expects AUTHZ,ORDER (seconds)")
        args.retry_after = (authz, order)
    else:
        args.retry_after = None
    if args.runs < 1 or args.runs_20 < 1:
        parser.error("--runs and --runs-20 must be at least 1")
    return args


def build_clients(args: argparse.Namespace, world: World) -> dict[str, Client]:
    made: dict[str, Client] = {}
    for name in args.clients:
        if name == "ours":
            made[name] = Ours(world)
        elif name == "minimal":
            made[name] = Minimal(world)
        elif name == "certbot":
            made[name] = Certbot(world, str(Path(args.certbot).resolve()))
        elif name == "lego":
            made[name] = Lego(world, str(Path(args.lego).resolve()))
    return made


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = args.workdir or Path(tempfile.mkdtemp(prefix="bench-"))
    base.mkdir(parents=True, exist_ok=True)
    secret = generate_tsig_secret()
    bind = QueryLoggingBind(base / "bind", [ZONE], tsig_name=TSIG_NAME, tsig_secret_b64=secret)
    bind.start()
    try:
        dns = bind.address
        pebble = PebbleServer(base / "pebble", dns, retry_after=args.retry_after)
        with pebble:
            host_port = pebble.directory_url.split("/")[2]
            acme_port = int(host_port.rsplit(":", 1)[1])
            with TcpRelay(("127.0.0.1", acme_port)) as relay:
                world = World(
                    directory=f"https://127.0.0.1:{relay.port}/dir",
                    ca_bundle=pebble.ca_bundle,
                    dns=dns,
                    tsig_secret=secret,
                    base=base,
                    concurrency=args.concurrency,
                    lego_propagation=args.lego_propagation,
                )
                clients = build_clients(args, world)
                rows = run_all(args, clients, relay, bind.log_path)
                profile = profile_ours(world, args.profile) if args.profile else ""
    finally:
        bind.stop()
    retry = (
        f"authz {args.retry_after[0]} s, order {args.retry_after[1]} s"
        if args.retry_after
        else "none (no Retry-After header)"
    )
    print()
    print(
        f"Pebble 2.10 (PEBBLE_VA_NOSLEEP=1, PEBBLE_AUTHZREUSE=0, PEBBLE_WFE_NONCEREJECT=0, "
        f"retryAfter: {retry}) + BIND 9 (RFC 2136, TSIG hmac-sha256) on loopback; "
        f"runs: {args.runs} (20 certificates: {args.runs_20}); ours: concurrency "
        f"{args.concurrency}; lego: {args.lego_propagation}"
    )
    print()
    print(format_table(rows))
    print()
    print(format_extras(rows))
    if profile:
        print()
        print(profile)
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "client": r.client,
                        "scenario": r.scenario,
                        "samples": [vars(s) for s in r.samples],
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
    print(f"\nlogs: {base}")
    return 0 if all(r.failures == 0 for r in rows) else 1


_IMPORT_RE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_summary(text: str, top: int = 12) -> str:
    """The costliest imports (cumulative) of a ``python -X importtime`` log, outermost only."""
    found: list[tuple[int, str]] = []
    total = 0
    for match in _IMPORT_RE.finditer(text):
        if len(match[3]) == 1:  # a module imported by __main__ itself, not a dependency
            cumulative = int(match[2])
            found.append((cumulative, match[4]))
            total += cumulative
    found.sort(reverse=True)
    lines = [f"imports: {total / 1e6:.3f} s in all (outermost modules, cumulative):"]
    lines += [f"  {us / 1e6:7.3f} s  {name}" for us, name in found[:top]]
    return "\n".join(lines)


def profile_ours(world: World, scenario: str, top: int = 20) -> str:
    """One run of ours under cProfile (every worker thread) with -X importtime."""
    import pstats  # noqa: PLC0415 - only for --profile

    client = Ours(world)
    tag = f"profile-{scenario}"
    job = client.jobs(tag, names_for("ours", tag, scenario))[0]
    stats_path = client.dir / f"{tag}.prof"
    assert job.argv[1:3] == ["-m", "renewer"]
    argv = [job.argv[0], "-X", "importtime", str(REPO / "bench" / "profile_ours.py")]
    argv += [str(stats_path), *job.argv[3:]]
    log = client.dir / f"{tag}.log"
    result = run_child(argv, env=job.env, cwd=job.cwd, log=log)
    out = [
        f"profile of ours, {SCENARIO_LABELS[scenario]}: {result.wall:.2f} s wall under "
        f"cProfile (exit {result.returncode}); stats in {stats_path}"
    ]
    out.append(import_summary(log.read_text(errors="replace")))
    for order in ("cumulative", "tottime"):
        stream = io.StringIO()
        stats = pstats.Stats(str(stats_path), stream=stream)
        stats.strip_dirs().sort_stats(order).print_stats(top)
        text = stream.getvalue()
        out.append(f"-- by {order} (all threads) --")
        out.append(text[text.index("   ncalls") :].rstrip() if "   ncalls" in text else text)
    return "\n".join(out)


def run_all(
    args: argparse.Namespace, clients: Mapping[str, Client], relay: TcpRelay, named_log: Path
) -> list[Row]:
    order = list(clients)
    # Warm-up, not timed: registers each client's account and warms the page cache.
    for name, client in clients.items():
        tag = "warm"
        sample = measure(client, tag, names_for(name, tag, "1name"), None, None)
        print(f"warm-up {name}: {sample.wall:.2f} s{'' if sample.ok else ' FAILED'}", flush=True)
        if isinstance(client, Certbot | Lego) and sample.ok:
            client.keep_account(tag)
    rows = {(c, s): Row(c, s, []) for s in args.scenarios for c in order}
    for scenario in args.scenarios:
        runs = args.runs_20 if scenario == "20certs" else args.runs
        for run in range(runs):
            # Alternate: each run starts with the next client.
            rotated = order[run % len(order) :] + order[: run % len(order)]
            for name in rotated:
                tag = f"{scenario}-r{run}"
                sample = measure(
                    clients[name], tag, names_for(name, tag, scenario), relay, named_log
                )
                rows[(name, scenario)].samples.append(sample)
                print(
                    f"{scenario} run {run + 1}/{runs} {name}: {sample.wall:.2f} s, cpu "
                    f"{sample.cpu:.2f} s, {sample.rss_mb:.0f} MB"
                    f"{'' if sample.ok else ' FAILED (see ' + str(clients[name].log) + ')'}",
                    flush=True,
                )
    return list(rows.values())


if __name__ == "__main__":
    sys.exit(main())
