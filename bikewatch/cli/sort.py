"""``bikewatch sort DIR``: drain a folder once, as the daemon would, then exit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command, add_model_arg, fail


def handle(args: argparse.Namespace) -> int:
    from bikewatch.config import ConfigError, load_settings, validate
    from bikewatch.logs import configure
    from bikewatch.offline.sorting import run_sort

    overrides = {"inbox": args.dir, "output": args.output, "log": args.log, "model": args.model}
    try:
        settings = validate(load_settings(args.config, overrides=overrides))
    except ConfigError as exc:
        return fail(str(exc))
    # Progress bar and summary are the interface here; the log only speaks up for problems.
    configure("console", "warning", stream=sys.stderr)
    return int(run_sort(settings, dry_run=args.dry_run, progress=sys.stderr.isatty() and not args.no_progress))


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "sort", handle, "sort every photo under DIR once, exactly as the daemon would, then exit",
                    "bikewatch sort ~/camera-dump --output ~/sorted --dry-run")
    p.add_argument("dir", type=Path, help="folder of photos (subfolders included); it is emptied of photos")
    p.add_argument("--output", type=Path, required=True, help="folder that receives mountain/, road/, rejected/")
    p.add_argument("--log", type=Path, help="CSV log (default OUTPUT/classifications.csv)")
    p.add_argument("--config", type=Path, help="TOML config for the other settings")
    add_model_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the planned moves, change nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
