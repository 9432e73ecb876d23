"""Command-line entry point: ``bikewatch COMMAND ...``, one module per command.

Each module in this package has ``add_parser(sub)`` (its options) and ``handle(args)``
(what it does, importing what it needs only then), so that ``bikewatch status`` never
loads TensorFlow or the service. Exit codes: :class:`bikewatch.exits.Exit` (README: Commands).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from bikewatch import __version__
from bikewatch.cli import classify, convert, corrections, evaluate, report, run, sort, status, train
from bikewatch.exits import Exit

COMMANDS = (run, sort, classify, train, convert, evaluate, report, corrections, status)
"""The command modules, in the order ``bikewatch --help`` lists them."""

def _quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter drowns the messages people need to read."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bikewatch",
        description="Watch an inbox and sort bike photos into mountain/ and road/ with a small CNN.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  bikewatch run --inbox /srv/bikewatch/inbox --output /srv/bikewatch/sorted",
    )
    parser.add_argument("--version", action="version", version=f"bikewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `bikewatch status | head -1`: the reader left. Say nothing more, like other Unix tools;
        # stdout goes to /dev/null so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return Exit.BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
