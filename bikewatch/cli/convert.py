"""``bikewatch convert MODEL``: write a model's LiteRT form into its .keras (what the service runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command, fail, needs_tensorflow
from bikewatch.exits import Exit


def handle(args: argparse.Namespace) -> int:
    from bikewatch.inference.model import ModelError, convert_model, load_classifier

    if (missing := needs_tensorflow("convert")) is not None:
        return fail(missing)
    if args.out is not None and args.out.suffix != ".keras":
        return fail(f"--out must end in .keras (got {args.out})")
    try:
        out = convert_model(args.model, args.out)
        identity = load_classifier(out, backend="litert").identity
    except ModelError as exc:
        return fail(str(exc))
    print(f"wrote {out} ({identity}): Keras and LiteRT models in one file")
    return Exit.OK


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "convert", handle,
                    "write a model's LiteRT form into it (what the service runs; needs TensorFlow)",
                    "bikewatch convert my-bikes.keras    # or: bikewatch convert seed-notebook.h5 --out seed.keras")
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="a .keras model or the seed notebook's .h5 (default: the embedded model, in place)")
    p.add_argument("--out", type=Path, default=None,
                   help="the .keras to write (default: MODEL itself, or NAME.keras beside an .h5)")
