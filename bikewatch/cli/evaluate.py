"""``bikewatch evaluate DATA_DIR``: a model's accuracy on class folders, or K-fold cross-validation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command, add_model_arg, fail, needs_tensorflow
from bikewatch.exits import Exit
from bikewatch.labels import CLASSES


def handle(args: argparse.Namespace) -> int:
    from bikewatch.inference.model import ModelError, load_classifier
    from bikewatch.offline.training import evaluate, kfold_command, load_dataset

    try:
        if args.kfold:
            if (missing := needs_tensorflow("evaluate --kfold")) is not None:
                return fail(missing)
            if args.kfold < 2:
                return fail("--kfold needs at least 2 folds")
            result = kfold_command(args.data_dir, args.kfold, epochs=args.epochs, seed=args.seed)
            if args.json:
                print(json.dumps(result, indent=2))
            return Exit.OK
        classifier = load_classifier(args.model)
        data = load_dataset(args.data_dir)
    except (ModelError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    m = evaluate(classifier, data)
    if args.json:
        print(json.dumps({"model": classifier.identity, **m.to_json()}, indent=2))
        return Exit.OK
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
    return Exit.OK


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "evaluate", handle, "accuracy, confusion matrix, precision/recall and misses on class folders",
                    "bikewatch evaluate ../shared/data/bikes/test")
    p.add_argument("data_dir", type=Path)
    add_model_arg(p)
    p.add_argument("--kfold", type=int, metavar="K", help="K-fold cross-validation of fresh models (the seed used 10)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per fold with --kfold (default: the recipe's)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="machine-readable output")
