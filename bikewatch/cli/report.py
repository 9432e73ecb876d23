"""``bikewatch report --out sheet.html``: a contact sheet of sorted photos, least certain first."""

from __future__ import annotations

import argparse
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command, add_log_source, fail
from bikewatch.exits import Exit


def handle(args: argparse.Namespace) -> int:
    from bikewatch.config import ConfigError
    from bikewatch.offline.corrections import resolve_log
    from bikewatch.offline.report import parse_since, write_report
    from bikewatch.store.ledger import read_rows

    if args.out.suffix.lower() not in (".png", ".html", ".htm"):
        return fail(f"--out must end in .png or .html (got {args.out})")
    if args.limit < 0:
        return fail("--limit must not be negative")
    try:
        log = resolve_log(args.log, args.config)
        since = parse_since(args.since) if args.since else None
    except (ConfigError, ValueError) as exc:
        return fail(str(exc))
    if not log.is_file():
        return fail(f"CSV log not found: {log}")
    try:
        sheet = write_report(read_rows(log), args.out, since=since, limit=args.limit, log=str(log))
    except OSError as exc:
        return fail(f"cannot write {args.out}: {exc.strerror or exc}")
    shown = sum(len(g.entries) for g in sheet.groups)
    left = sum(g.omitted for g in sheet.groups)
    counts = ", ".join(f"{g.label} {g.total}" for g in sheet.groups)
    print(f"wrote {args.out}: {shown} thumbnails ({counts}), {sheet.rejected_total} rejected"
          + (f"; {left} thumbnails left out by --limit {args.limit}" if left else ""))
    return Exit.OK


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "report", handle, "contact sheet of sorted photos (least certain first) and rejected files",
                    "bikewatch report --config /etc/bikewatch/bikewatch.toml --since today --out today.html")
    add_log_source(p)
    p.add_argument("--since", metavar="WHEN",
                   help="only files sorted since WHEN: ISO date/time (2024-05-01, 2024-05-01T08:00; local time "
                        "unless it names a zone), 90m, 24h, 7d, 2w, today or yesterday")
    p.add_argument("--limit", type=int, default=200, help="at most this many thumbnails per label (default 200)")
    p.add_argument("--out", type=Path, required=True, help="sheet.png (Pillow) or sheet.html (self-contained)")
