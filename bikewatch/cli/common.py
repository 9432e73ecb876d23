"""What the command modules share: one error line, the common options, one sub-parser shape.

Kept free of heavy imports: building the parser loads only this, argparse and each
command's ``add_parser``; a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from bikewatch.exits import Exit

Handler = Callable[[argparse.Namespace], int]
SubParsers = Any
"""``argparse._SubParsersAction``, which argparse does not name publicly."""


def fail(message: str, code: int = Exit.USAGE) -> int:
    """Print ``bikewatch: error: MESSAGE`` to stderr and return ``code`` (the command's exit status)."""
    print(f"bikewatch: error: {message}", file=sys.stderr)
    return int(code)


def add_command(sub: SubParsers, name: str, handler: Handler, help: str, example: str) -> argparse.ArgumentParser:
    """A sub-command whose help shows one example, run by ``handler``."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handler)
    return p


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model file (.keras with its LiteRT form inside, a .tflite with NAME.tflite.contract.json, "
                        "or the seed notebook's .h5, which needs TensorFlow); default: the embedded model")


def add_log_source(p: argparse.ArgumentParser) -> None:
    """``--log CSV`` or ``--config FILE``: where ``report`` and ``corrections`` find the CSV log."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--log", type=Path, metavar="CSV", help="the CSV log to read")
    src.add_argument("--config", type=Path, metavar="FILE",
                     help="TOML config: read its log (default OUTPUT/classifications.csv)")


def needs_tensorflow(purpose: str) -> str | None:
    """One line saying how to install TensorFlow when ``purpose`` needs it and it is missing."""
    from bikewatch.inference.runtime import TRAIN_EXTRA, tensorflow_installed

    return None if tensorflow_installed() else f"{purpose} needs TensorFlow, which is not installed: {TRAIN_EXTRA}"
