"""``bikewatch train DATA_DIR --out MODEL.keras``: a fresh or fine-tuned CNN with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from bikewatch.cli.common import SubParsers, add_command, fail, needs_tensorflow
from bikewatch.exits import Exit


def handle(args: argparse.Namespace) -> int:
    from bikewatch.inference.model import ModelError, load_classifier
    from bikewatch.offline.training import train_command

    if (missing := needs_tensorflow("train")) is not None:
        return fail(missing)
    if args.out.suffix != ".keras":
        return fail(f"--out must end in .keras (got {args.out})")
    if args.log is not None and not args.log.is_file():
        return fail(f"--log: CSV log not found: {args.log}")
    base = None
    if args.fine_tune:
        try:
            base = load_classifier(None if args.fine_tune == "default" else args.fine_tune, backend="keras")
        except ModelError as exc:
            return fail(str(exc))
    try:
        card = train_command(
            args.data_dir, args.out, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
            val_split=args.val_split, augment=not args.no_augment, base=base, original=args.original, log=args.log,
            temperature=args.temperature,
        )
    except (FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    if args.log is not None:  # accuracy on the photos people moved, before and after
        from bikewatch.offline.corrections import evaluate_corrections
        from bikewatch.offline.training import write_card

        card["corrections"] = evaluate_corrections(args.log, before=base, after=load_classifier(args.out))
        write_card(card, args.out)
    return Exit.OK


def add_parser(sub: SubParsers) -> None:
    p = add_command(sub, "train", handle, "train the CNN on class folders DATA_DIR/mountain and DATA_DIR/road",
                    "bikewatch train ../shared/data/bikes/train --out my-bikes.keras")
    p.add_argument("data_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="model file to write (.keras); a .card.json goes beside it")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the photos (default: the recipe's 50; at most 30 when fine-tuning, stopping early)")
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
