"""``bikewatch corrections``: photos people moved to another label folder after sorting."""

from __future__ import annotations

import argparse
import csv
import sys

from bikewatch.cli.common import SubParsers, add_command, add_log_source, fail
from bikewatch.exits import Exit


def handle(args: argparse.Namespace) -> int:
    from bikewatch.config import ConfigError
    from bikewatch.offline.corrections import find_corrections_in_log, format_table, resolve_log, summary
    from bikewatch.store.ledger import probability_field

    try:
        log = resolve_log(args.log, args.config)
    except ConfigError as exc:
        return fail(str(exc))
    if not log.is_file():
        return fail(f"CSV log not found: {log}")
    findings = find_corrections_in_log(log)
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["file", "logged_label", "current_label", "confidence", "path"])
        for c in findings.corrections:
            writer.writerow([c.display, c.logged, c.current, probability_field(c.confidence), str(c.path)])
        print(summary(findings), file=sys.stderr)
    else:
        if findings.corrections:
            print(format_table(findings))
        print(summary(findings))
    return Exit.OK


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "corrections", handle, "photos people moved to another label folder after sorting",
                    "bikewatch corrections --log /srv/bikewatch/sorted/classifications.csv")
    add_log_source(p)
    p.add_argument("--format", choices=("table", "csv"), default="table")
