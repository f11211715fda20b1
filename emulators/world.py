"""The whole outside world on loopback, as one context manager: Pebble, the DNS server
Pebble asks, a Cloudflare-compatible API in front of it, a Fly-compatible API whose
machines are real SMTP servers, a dotenv-fed SMTP server, and a MailPace sink.

``renewer demo`` and the integration tests both build this, so the demo is a tested path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from emulators.cloudflare_api import CloudflareApi, TokenScope, new_token
from emulators.dns_server import DnsServer, RecordStore
from emulators.fly_api import FlyApi, MachineSpec
from emulators.mailpace_api import MailPaceSink
from emulators.pebble import PebbleServer
from emulators.processes import stop_process

ZONE = "example.test"
ZONE_ID = "023e105f4ecef8ad9ca31a8372d0c353"
SUBMISSION_APP = "demo-submission"
INBOUND_APP = "demo-inbound"
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorldOptions:
    """Knobs for tests; the defaults are the demo."""

    nonce_reject: int = 0
    va_sleep: bool = False
    profiles: Mapping[str, int] | None = None
    submission_machines: int = 2
    inbound_machines: int = 1
    with_fly: bool = True
    with_dotenv: bool = True
    with_notify: bool = True
    zone_ids_in_config: bool = False
    before_days: int = 30
    smoke_check: float = 2.0
    extra_config: Mapping[str, Any] = field(default_factory=dict)


class LocalWorld:
    """Starts everything under ``workdir``; ``config()`` and ``env()`` describe it to the job."""

    def __init__(self, workdir: Path, options: WorldOptions | None = None) -> None:
        self.workdir = workdir
        self.options = options or WorldOptions()
        self.store = RecordStore()
        self.cloudflare_token = new_token()
        self.fly_token = "FlyV1 fm2_" + new_token()
        self.mailpace_token = "mp-" + new_token()
        self._stack = ExitStack()
        self.dns: DnsServer
        self.pebble: PebbleServer
        self.cloudflare: CloudflareApi
        self.fly: FlyApi | None = None
        self.mailpace: MailPaceSink | None = None
        self.relay_process: subprocess.Popen[bytes] | None = None
        self.relay_port = 0
        self.fronts: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalWorld:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        opts = self.options
        self.dns = self._stack.enter_context(DnsServer(self.store, [ZONE]))
        self.pebble = self._stack.enter_context(
            PebbleServer(
                self.workdir / "pebble",
                self.dns.address,
                nonce_reject=opts.nonce_reject,
                va_sleep=opts.va_sleep,
                profiles=opts.profiles,
            )
        )
        self.cloudflare = self._stack.enter_context(
            CloudflareApi(
                self.store,
                {ZONE: ZONE_ID},
                {self.cloudflare_token: TokenScope(zone_ids=frozenset({ZONE_ID}))},
            )
        )
        if opts.with_fly:
            fly_secret = self.fly_token.removeprefix("FlyV1 ")
            self.fly = self._stack.enter_context(
                FlyApi(
                    self.workdir / "fly",
                    tokens={fly_secret: frozenset({SUBMISSION_APP, INBOUND_APP})},
                )
            )
            self.fly.add_app(
                SUBMISSION_APP,
                [MachineSpec(listen=("587/starttls", "465/tls"))] * opts.submission_machines,
            )
            self.fly.add_app(
                INBOUND_APP, [MachineSpec(listen=("25/starttls",))] * opts.inbound_machines
            )
            for app, port in ((SUBMISSION_APP, 587), (SUBMISSION_APP, 465), (INBOUND_APP, 25)):
                self.fronts[(app, port)] = self.fly.front_port(app, port)
        if opts.with_dotenv:
            self._start_relay()
        if opts.with_notify:
            self.mailpace = self._stack.enter_context(
                MailPaceSink({self.mailpace_token: ZONE}, print_messages=True)
            )

    def _start_relay(self) -> None:
        """A plain SMTP server fed by a dotenv file, reloaded with SIGHUP (the dotenv target)."""
        env_file = self.workdir / "relay.env"
        env_file.touch(mode=0o600)
        ready = self.workdir / "relay.ready"
        argv = [
            sys.executable,
            "-m",
            "emulators.smtp_server",
            "--listen",
            "127.0.0.1:0/starttls",  # it binds a free port itself and names it when ready
            "--env-file",
            str(env_file),
            "--ready-file",
            str(ready),
        ]
        env = {**os.environ, "PYTHONPATH": str(_REPO_ROOT)}
        log = (self.workdir / "relay.log").open("ab")
        self._stack.callback(log.close)
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._stack.callback(stop_process, process)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"relay SMTP server did not start; see {self.workdir / 'relay.log'}"
                )
            time.sleep(0.05)
        self.relay_process = process
        self.relay_port = int(json.loads(ready.read_text())["ports"][0])

    # ------------------------------------------------------------------ description

    def config(self) -> dict[str, Any]:
        """The renewer's JSON config for this world (paths relative to ``workdir``)."""
        opts = self.options
        certificates: list[dict[str, Any]] = []
        if opts.with_fly:
            certificates.append(
                {
                    "name": "submission",
                    "domains": [f"smtp.{ZONE}", f"submission.{ZONE}"],
                    "endpoints": [
                        f"127.0.0.1:{self.fronts[(SUBMISSION_APP, 587)]}/starttls",
                        f"127.0.0.1:{self.fronts[(SUBMISSION_APP, 465)]}/tls",
                    ],
                    "targets": [
                        {
                            "type": "fly",
                            "app": SUBMISSION_APP,
                            "api_base_url": self._fly_url(),
                            "wait_timeout": 60,
                            "smoke_check": opts.smoke_check,
                        }
                    ],
                }
            )
            certificates.append(
                {
                    "name": "inbound",
                    "domains": [f"mx.{ZONE}"],
                    "endpoints": [f"127.0.0.1:{self.fronts[(INBOUND_APP, 25)]}/starttls"],
                    "targets": [
                        {
                            "type": "fly",
                            "app": INBOUND_APP,
                            "api_base_url": self._fly_url(),
                            "wait_timeout": 60,
                            "smoke_check": opts.smoke_check,
                        }
                    ],
                }
            )
        if opts.with_dotenv:
            assert self.relay_process is not None
            certificates.append(
                {
                    "name": "relay",
                    "domains": [f"relay.{ZONE}"],
                    "endpoints": [f"127.0.0.1:{self.relay_port}/starttls"],
                    "targets": [
                        {
                            "type": "dotenv",
                            "path": "relay.env",
                            "reload_command": ["kill", "-HUP", str(self.relay_process.pid)],
                        }
                    ],
                }
            )
        config: dict[str, Any] = {
            "acme": {
                "directory": self.pebble.directory_url,
                "email": f"ops@{ZONE}",
                "ca_bundle": str(self.pebble.ca_bundle.relative_to(self.workdir)),
                "account_key_file": "acme-account.pem",
            },
            "dns": {
                "provider": "cloudflare",
                "api_base_url": self.cloudflare.base_url,
                "nameservers": ["{}:{}".format(*self.dns.address)],
                "propagation_timeout": 30,
            },
            "renewal": {"before_days": opts.before_days, "ari": True, "concurrency": 4},
            "certificates": certificates,
        }
        if opts.zone_ids_in_config:
            config["dns"]["zone_ids"] = {ZONE: ZONE_ID}
        if opts.with_notify and self.mailpace is not None:
            config["notify"] = {
                "type": "mailpace",
                "from": f"certs@{ZONE}",
                "to": f"ops@{ZONE}",
                "api_base_url": self.mailpace.base_url,
            }
        for key, value in opts.extra_config.items():
            config[key] = value
        return config

    def env(self) -> dict[str, str]:
        """The secrets the job reads from its environment."""
        env = {"CLOUDFLARE_API_TOKEN": self.cloudflare_token}
        if self.options.with_fly:
            env["FLY_API_TOKEN"] = self.fly_token
        if self.options.with_notify:
            env["MAILPACE_TOKEN"] = self.mailpace_token
        return env

    def write_config(self, name: str = "renewer.json") -> Path:
        path = self.workdir / name
        path.write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")
        return path

    def _fly_url(self) -> str:
        assert self.fly is not None
        return self.fly.base_url

    def secret_values(self) -> list[str]:
        """Every secret this world handed out, for leak scans."""
        return [
            self.cloudflare_token,
            self.fly_token,
            self.fly_token.removeprefix("FlyV1 "),
            self.mailpace_token,
        ]
