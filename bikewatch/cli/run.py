"""``bikewatch run``: the service. The parsing lives here; the service itself is bikewatch.service (run.py wires it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command, add_model_arg


def handle(args: argparse.Namespace) -> int:
    from bikewatch.service.run import run_service

    return int(run_service(args))


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "run", handle, "run the service: watch the inbox and sort photos as they arrive",
                    "bikewatch run --config /etc/bikewatch/bikewatch.toml")
    p.add_argument("--config", type=Path, help="TOML config file (see config/bikewatch.toml)")
    p.add_argument("--inbox", type=Path, help="folder to watch")
    p.add_argument("--output", type=Path, help="folder that receives mountain/, road/, rejected/")
    p.add_argument("--log", type=Path, help="CSV log (default OUTPUT/classifications.csv)")
    add_model_arg(p)
