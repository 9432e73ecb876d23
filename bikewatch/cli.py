"""Command-line entry point: ``bikewatch COMMAND ...``.

Exit codes are shell-friendly: 0 success, 1 some files failed (classify/sort)
or the service stopped on an error, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from bikewatch import __version__

EXIT_OK, EXIT_FILES_FAILED, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


def _quiet_tensorflow() -> None:
    """TensorFlow's C++ start-up chatter drowns the messages people need to read."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"bikewatch: error: {message}", file=sys.stderr)
    return code


def cmd_classify(args: argparse.Namespace) -> int:
    from bikewatch.offline.classify import classify_paths, expand_paths, to_csv, to_json, to_table
    from bikewatch.inference.model import ModelError, load_classifier

    paths = expand_paths(args.paths)
    if not paths:
        return _fail("no image files found in the given paths")
    try:
        classifier = load_classifier(args.model)
    except ModelError as exc:
        return _fail(str(exc))
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
        return EXIT_FILES_FAILED
    return EXIT_OK


def _needs_tensorflow(purpose: str) -> str | None:
    """One line saying how to install TensorFlow when ``purpose`` needs it and it is missing."""
    from bikewatch.inference.runtime import TRAIN_EXTRA, tensorflow_installed

    return None if tensorflow_installed() else f"{purpose} needs TensorFlow, which is not installed: {TRAIN_EXTRA}"


def cmd_convert(args: argparse.Namespace) -> int:
    from bikewatch.inference.model import ModelError, convert_model, load_classifier

    if (missing := _needs_tensorflow("convert")) is not None:
        return _fail(missing)
    if args.out is not None and args.out.suffix != ".keras":
        return _fail(f"--out must end in .keras (got {args.out})")
    try:
        out = convert_model(args.model, args.out)
        identity = load_classifier(out, backend="litert").identity
    except ModelError as exc:
        return _fail(str(exc))
    print(f"wrote {out} ({identity}): Keras and LiteRT models in one file")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from bikewatch.inference.model import ModelError, load_classifier
    from bikewatch.offline.training import train_command

    if (missing := _needs_tensorflow("train")) is not None:
        return _fail(missing)
    if args.out.suffix != ".keras":
        return _fail(f"--out must end in .keras (got {args.out})")
    if args.log is not None and not args.log.is_file():
        return _fail(f"--log: CSV log not found: {args.log}")
    base = None
    if args.fine_tune:
        try:
            base = load_classifier(None if args.fine_tune == "default" else args.fine_tune, backend="keras")
        except ModelError as exc:
            return _fail(str(exc))
    try:
        card = train_command(
            args.data_dir, args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
            val_split=args.val_split, augment=not args.no_augment, base=base, original=args.original, log=args.log,
            temperature=args.temperature,
        )
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    if args.log is not None:  # accuracy on the photos people moved, before and after
        from bikewatch.offline.corrections import evaluate_corrections
        from bikewatch.offline.training import write_card

        card["corrections"] = evaluate_corrections(args.log, before=base, after=load_classifier(args.out))
        write_card(card, args.out)
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from bikewatch.inference.model import CLASSES, ModelError, load_classifier
    from bikewatch.offline.training import evaluate, kfold_command, load_dataset

    try:
        if args.kfold:
            if (missing := _needs_tensorflow("evaluate --kfold")) is not None:
                return _fail(missing)
            if args.kfold < 2:
                return _fail("--kfold needs at least 2 folds")
            result = kfold_command(args.data_dir, args.kfold, epochs=args.epochs, seed=args.seed)
            if args.json:
                print(json.dumps(result, indent=2))
            return EXIT_OK
        classifier = load_classifier(args.model)
        data = load_dataset(args.data_dir)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    m = evaluate(classifier, data)
    if args.json:
        print(json.dumps({"model": classifier.identity, **m.to_json()}, indent=2))
        return EXIT_OK
    print(f"model      {classifier.identity}")
    print(f"photos     {m.count}   accuracy {m.accuracy:.3f} ({round(m.accuracy * m.count)}/{m.count})")
    print("confusion  (rows: true, columns: predicted)")
    print(f"           {'':10}" + "".join(f"{c:>10}" for c in CLASSES))
    for name, row in zip(CLASSES, m.confusion):
        print(f"           {name:10}" + "".join(f"{v:>10}" for v in row))
    for name in CLASSES:
        print(f"{name:10} precision {m.precision[name]:.3f}  recall {m.recall[name]:.3f}")
    for path, why in data.skipped:
        print(f"skipped    {path}: {why}")
    if m.misclassified:
        print("misclassified:")
        for miss in m.misclassified:
            print(f"  {miss['path']}: true {miss['true']}, predicted {miss['predicted']} ({miss['confidence']:.3f})")
    else:
        print("misclassified: none")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from bikewatch.service.run import run_service

    return run_service(args)


def cmd_sort(args: argparse.Namespace) -> int:
    from bikewatch.config import ConfigError, load_settings, validate
    from bikewatch.logs import configure
    from bikewatch.offline.sorting import run_sort

    overrides = {"inbox": args.dir, "output": args.output, "log": args.log, "model": args.model}
    try:
        settings = validate(load_settings(args.config, overrides=overrides))
    except ConfigError as exc:
        return _fail(str(exc))
    # Progress bar and summary are the interface here; the log only speaks up for problems.
    configure("console", "warning", stream=sys.stderr)
    return run_sort(settings, dry_run=args.dry_run, progress=sys.stderr.isatty() and not args.no_progress)


def cmd_report(args: argparse.Namespace) -> int:
    from bikewatch.config import ConfigError
    from bikewatch.offline.corrections import resolve_log
    from bikewatch.store.ledger import read_rows
    from bikewatch.offline.report import parse_since, write_report

    if args.out.suffix.lower() not in (".png", ".html", ".htm"):
        return _fail(f"--out must end in .png or .html (got {args.out})")
    if args.limit < 0:
        return _fail("--limit must not be negative")
    try:
        log = resolve_log(args.log, args.config)
        since = parse_since(args.since) if args.since else None
    except (ConfigError, ValueError) as exc:
        return _fail(str(exc))
    if not log.is_file():
        return _fail(f"CSV log not found: {log}")
    try:
        sheet = write_report(read_rows(log), args.out, since=since, limit=args.limit, log=str(log))
    except OSError as exc:
        return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    shown = sum(len(g.entries) for g in sheet.groups)
    left = sum(g.omitted for g in sheet.groups)
    counts = ", ".join(f"{g.label} {g.total}" for g in sheet.groups)
    print(f"wrote {args.out}: {shown} thumbnails ({counts}), {sheet.rejected_total} rejected"
          + (f"; {left} thumbnails left out by --limit {args.limit}" if left else ""))
    return EXIT_OK


def cmd_corrections(args: argparse.Namespace) -> int:
    import csv

    from bikewatch.config import ConfigError
    from bikewatch.offline.corrections import find_corrections_in_log, format_table, resolve_log, summary

    try:
        log = resolve_log(args.log, args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    if not log.is_file():
        return _fail(f"CSV log not found: {log}")
    findings = find_corrections_in_log(log)
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["file", "logged_label", "current_label", "confidence", "path"])
        for c in findings.corrections:
            writer.writerow([c.display, c.logged, c.current, "" if c.confidence is None else f"{c.confidence:.6f}",
                             str(c.path)])
        print(summary(findings), file=sys.stderr)
    else:
        if findings.corrections:
            print(format_table(findings))
        print(summary(findings))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from bikewatch.offline.status import run_status

    return run_status(args)


def _add_log_source(p: argparse.ArgumentParser) -> None:
    """``--log CSV`` or ``--config FILE``: where ``report`` and ``corrections`` find the CSV log."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--log", type=Path, metavar="CSV", help="the CSV log to read")
    src.add_argument("--config", type=Path, metavar="FILE",
                     help="TOML config: read its log (default OUTPUT/classifications.csv)")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="model file (.keras with its LiteRT form inside, a .tflite with NAME.tflite.contract.json, "
                        "or the seed notebook's .h5, which needs TensorFlow); default: the embedded model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bikewatch",
        description="Watch an inbox and sort bike photos into mountain/ and road/ with a small CNN.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  bikewatch run --inbox /srv/bikewatch/inbox --output /srv/bikewatch/sorted",
    )
    parser.add_argument("--version", action="version", version=f"bikewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        return p

    p = add("run", cmd_run, "run the service: watch the inbox and sort photos as they arrive",
            "bikewatch run --config /etc/bikewatch/bikewatch.toml")
    p.add_argument("--config", type=Path, help="TOML config file (see config/bikewatch.toml)")
    p.add_argument("--inbox", type=Path, help="folder to watch")
    p.add_argument("--output", type=Path, help="folder that receives mountain/, road/, rejected/")
    p.add_argument("--log", type=Path, help="CSV log (default OUTPUT/classifications.csv)")
    _add_model_arg(p)

    p = add("sort", cmd_sort, "sort every photo under DIR once, exactly as the daemon would, then exit",
            "bikewatch sort ~/camera-dump --output ~/sorted --dry-run")
    p.add_argument("dir", type=Path, help="folder of photos (subfolders included); it is emptied of photos")
    p.add_argument("--output", type=Path, required=True, help="folder that receives mountain/, road/, rejected/")
    p.add_argument("--log", type=Path, help="CSV log (default OUTPUT/classifications.csv)")
    p.add_argument("--config", type=Path, help="TOML config for the other settings")
    _add_model_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print the planned moves, change nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("classify", cmd_classify, "classify photos without moving them",
            "bikewatch classify photos/ --format csv > results.csv")
    p.add_argument("paths", nargs="+", help="image files or folders (a folder means its image files)")
    _add_model_arg(p)
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--batch-size", type=int, default=64)

    p = add("train", cmd_train, "train the CNN on class folders DATA_DIR/mountain and DATA_DIR/road",
            "bikewatch train ../shared/data/bikes/train --out my-bikes.keras")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="model file to write (.keras); a .card.json goes beside it")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the photos (default: the recipe's 50; at most 25 when fine-tuning, stopping early)")
    p.add_argument("--batch-size", type=int, default=None, help="photos per step (default: the recipe's 16)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--original", type=Path, metavar="DIR",
                   help="with --fine-tune: the base model's training photos (default: the folder its model card "
                        "names, when present), trained on together with DATA_DIR so nothing is forgotten")
    p.add_argument("--val-split", type=float, default=0.2, help="fraction held out for the model card's metrics")
    p.add_argument("--no-augment", action="store_true", help="train on the photos as they are (flips only)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="fold this confidence temperature into the model instead of fitting one on the validation "
                        "split (e.g. the out-of-fold one printed by benchmarks/recipes.py)")
    p.add_argument("--fine-tune", metavar="MODEL", nargs="?", const="default",
                   help="start from MODEL (default: the embedded model) instead of random weights")
    p.add_argument("--log", type=Path, metavar="CSV",
                   help="bikewatch's CSV log: also report accuracy on the photos people moved to the other "
                        "class folder (before and after, with --fine-tune); DATA_DIR is then usually OUTPUT")

    p = add("convert", cmd_convert, "write a model's LiteRT form into it (what the service runs; needs TensorFlow)",
            "bikewatch convert my-bikes.keras    # or: bikewatch convert seed-notebook.h5 --out seed.keras")
    p.add_argument("model", type=Path, nargs="?", default=None,
                   help="a .keras model or the seed notebook's .h5 (default: the embedded model, in place)")
    p.add_argument("--out", type=Path, default=None,
                   help="the .keras to write (default: MODEL itself, or NAME.keras beside an .h5)")

    p = add("evaluate", cmd_evaluate, "accuracy, confusion matrix, precision/recall and misses on class folders",
            "bikewatch evaluate ../shared/data/bikes/test")
    p.add_argument("data_dir", type=Path)
    _add_model_arg(p)
    p.add_argument("--kfold", type=int, metavar="K", help="K-fold cross-validation of fresh models (the seed used 10)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold with --kfold (default: the recipe's)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("report", cmd_report, "contact sheet of sorted photos (least certain first) and rejected files",
            "bikewatch report --config /etc/bikewatch/bikewatch.toml --since today --out today.html")
    _add_log_source(p)
    p.add_argument("--since", metavar="WHEN",
                   help="only files sorted since WHEN: ISO date/time (2024-05-01, 2024-05-01T08:00; local time "
                        "unless it names a zone), 90m, 24h, 7d, 2w, today or yesterday")
    p.add_argument("--limit", type=int, default=200, help="at most this many thumbnails per label (default 200)")
    p.add_argument("--out", type=Path, required=True, help="sheet.png (Pillow) or sheet.html (self-contained)")

    p = add("corrections", cmd_corrections, "photos people moved to another label folder after sorting",
            "bikewatch corrections --log /srv/bikewatch/sorted/classifications.csv")
    _add_log_source(p)
    p.add_argument("--format", choices=("table", "csv"), default="table")

    p = add("status", cmd_status, "is the service running, files waiting, counts today and in total, last error",
            "bikewatch status --config /etc/bikewatch/bikewatch.toml")
    p.epilog = (p.epilog or "") + (
        "\n\nexit status (like systemctl status):\n  0  running\n  3  not running "
        "(also when only a stale status file of a dead worker is left)\n  2  the configuration cannot be read")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML config file (default: BIKEWATCH_CONFIG, else built-in defaults)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_tensorflow()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `bikewatch status | head -1`: the reader left. Say nothing more, like other Unix tools;
        # stdout goes to /dev/null so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by it


if __name__ == "__main__":
    sys.exit(main())
