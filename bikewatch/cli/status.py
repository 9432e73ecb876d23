"""``bikewatch status``: is the service running, what waits, what it has done (exit status like systemctl's)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command
from bikewatch.exits import Exit


def handle(args: argparse.Namespace) -> int:
    from bikewatch.offline.status import run_status

    return int(run_status(args))


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "status", handle, "is the service running, files waiting, counts today and in total, last error",
                    "bikewatch status --config /etc/bikewatch/bikewatch.toml")
    p.epilog = (p.epilog or "") + (
        f"\n\nexit status (like systemctl status):\n  {Exit.OK:d}  running\n  {Exit.NOT_RUNNING:d}  not running "
        f"(also when only a stale status file of a dead worker is left)\n  {Exit.USAGE:d}  the configuration cannot be read")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML config file (default: BIKEWATCH_CONFIG, else built-in defaults)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
