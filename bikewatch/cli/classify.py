"""``bikewatch classify PATHS``: confidences for photos, moving nothing."""

from __future__ import annotations

import argparse
import sys

from bikewatch.cli.common import SubParsers, add_command, add_model_arg, fail
from bikewatch.exits import Exit


def handle(args: argparse.Namespace) -> int:
    from bikewatch.inference.model import ModelError, load_classifier
    from bikewatch.offline.classify import classify_paths, expand_paths, to_csv, to_json, to_table

    paths = expand_paths(args.paths)
    if not paths:
        return fail("no image files found in the given paths")
    try:
        classifier = load_classifier(args.model)
    except ModelError as exc:
        return fail(str(exc))
    results = classify_paths(classifier, paths, batch_size=args.batch_size)
    if args.format == "csv":
        sys.stdout.write(to_csv(results, classifier.identity))
    elif args.format == "json":
        sys.stdout.write(to_json(results, classifier.identity) + "\n")
    else:
        print(to_table(results))
    failed = sum(1 for r in results if r.error)
    if failed:
        print(f"bikewatch: {failed} of {len(results)} files could not be classified", file=sys.stderr)
        return Exit.FAILED
    return Exit.OK


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "classify", handle, "classify photos without moving them",
                    "bikewatch classify photos/ --format csv > results.csv")
    p.add_argument("paths", nargs="+", help="image files or folders (a folder means its image files)")
    add_model_arg(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--batch-size", type=int, default=64)
