"""``python -m renewer`` / ``renewer``: run, check, demo.

Exit codes (DESIGN.md): 0 renewed or nothing due; 1 a step failed (or ``check`` found a
problem); 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from renewer.errors import ConfigError
from renewer.report import write_json

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"renewer: usage error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="renewer", description="Keeps TLS certificates fresh on SMTP servers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="decide, issue, validate, deploy, verify, report")
    run.add_argument("--config", help="JSON config file (default: $RENEWER_CONFIG)")
    run.add_argument("--force", action="store_true", help="renew even if nothing is due")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="decide, issue (staging directory if configured) and validate; deploy nothing",
    )
    run.add_argument("--report-json", help="write the JSON report to this file")
    run.add_argument("--quiet", action="store_true", help="print only warnings and the report")
    check = sub.add_parser(
        "check", help="probe the live endpoints and pre-flight the tokens; change nothing"
    )
    check.add_argument("--config", help="JSON config file (default: $RENEWER_CONFIG)")
    check.add_argument("--report-json", help="write the JSON report to this file")
    demo = sub.add_parser("demo", help="the whole run on this machine, no account needed")
    demo.add_argument("--workdir", help="keep the demo's files here (default: a temp folder)")
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(threadName)s] %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    # Third-party chatter (urllib3 connection pools, acme's debug) is not for operators.
    for name in ("urllib3", "acme", "mail.log", "asyncio"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _check_report_path(path: str | None) -> None:
    """Fails at the start, not after the work, when the report cannot be written."""
    if path and not Path(path).resolve().parent.is_dir():
        raise ConfigError("--report-json", f"the folder of {path!r} does not exist")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    if args.command == "demo":
        from renewer.demo import run_demo  # noqa: PLC0415 - the demo pulls in the emulators

        _setup_logging(quiet=False)
        return run_demo(Path(args.workdir) if args.workdir else None)
    _setup_logging(quiet=getattr(args, "quiet", False))
    # Imported here so `renewer --help` stays instant.
    from renewer.cli import run_check, run_renewal  # noqa: PLC0415

    try:
        _check_report_path(args.report_json)
        if args.command == "check":
            return run_check(args.config, env, args.report_json)
        return run_renewal(
            args.config,
            env,
            force=args.force,
            dry_run=args.dry_run,
            report_json=args.report_json,
        )
    except ConfigError as exc:
        sys.stderr.write(f"renewer: configuration error: {exc}\n")
        write_json(
            getattr(args, "report_json", None),
            {
                "status": "failed",
                "certificates": [],
                "error": {"step": "config", "message": str(exc)},
            },
        )
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
