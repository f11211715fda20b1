"""``renewer demo``: the whole job on this machine, no account needed.

Starts the loopback world (Pebble, DNS, Cloudflare/Fly/MailPace stand-ins, SMTP servers),
runs a renewal that rolls the new certificates across the machines and verifies them
over STARTTLS and implicit TLS, then runs again to show "nothing due".
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from renewer.cli import run_renewal

log = logging.getLogger("renewer.demo")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_demo(workdir: Path | None = None) -> int:
    from emulators.world import LocalWorld  # noqa: PLC0415 - demo-only dependency

    keep = workdir is not None
    root = workdir or Path(tempfile.mkdtemp(prefix="renewer-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        _say(f"== renewer demo: everything runs on loopback, files in {root}")
        with LocalWorld(root) as world:
            config_path = world.write_config()
            _say(f"   Pebble (ACME CA):        {world.pebble.directory_url}")
            _say("   DNS server (for Pebble): {}:{}".format(*world.dns.address))
            _say(f"   Cloudflare API:          {world.cloudflare.base_url}")
            if world.fly is not None:
                _say(f"   Fly Machines API:        {world.fly.base_url}")
                for (app, port), front in sorted(world.fronts.items()):
                    _say(f"     app {app}: port {port} -> 127.0.0.1:{front}")
            _say(f"   relay SMTP (dotenv):     127.0.0.1:{world.relay_port}")
            if world.mailpace is not None:
                _say(f"   MailPace sink:           {world.mailpace.base_url}")
            _say(f"   config:                  {config_path}")
            env = world.env()

            runs = []
            for number, title in (
                (1, "the endpoints serve placeholder certificates, so renewal is due"),
                (2, "right after a successful run, nothing is due"),
            ):
                _say(f"\n== run {number}: {title}")
                run_started = time.monotonic()
                code = run_renewal(
                    str(config_path),
                    env,
                    force=False,
                    dry_run=False,
                    report_json=str(root / f"report-{number}.json"),
                    cwd=root,
                )
                runs.append((code, time.monotonic() - run_started))
        (first, first_seconds), (second, second_seconds) = runs
        _say(
            f"\n== demo finished in {time.monotonic() - started:.1f}s: run 1 exit {first} "
            f"({first_seconds:.1f}s), run 2 exit {second} ({second_seconds:.1f}s); "
            + (f"reports in {root}" if keep else "(--workdir DIR keeps its files)")
        )
        return 0 if first == 0 and second == 0 else 1
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
