"""Which training recipe carries over to users' photos? K-fold over train/, several seeds.

Each fold's held-out bikes are measured twice: as the product shots they are ("clean"), and as
user-like photos made from them (``augment.USER_SPEC``: pasted on backgrounds, one family of
which training never uses, other aspect, scale, crops, colour, darkness, blur, JPEG). The
mirror rate is the share of user-like views whose exact mirror image gets another label.
Out-of-fold probabilities give the calibration (ECE before/after a temperature fitted on them).
The seed notebook's model is measured on the same views; it was trained on all of train/, so
its figures are on photos it has seen (an upper bound for it).

    .venv/bin/python benchmarks/recipes.py --recipes seed-aug,composite --seeds 1,2,3 --folds 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bikewatch.offline import training as T  # noqa: E402
from bikewatch.offline.augment import USER_SPEC, make_views  # noqa: E402

RECIPES = {
    "seed-aug": None,  # the project's previous recipe: Keras layer augmentation, Adam, 20 epochs
    # the first try: all of augment.TRAIN_SPEC (bikes down to 55% of the frame), no warm-up
    "composite": replace(T.DEFAULT_RECIPE, name="composite", spec="train", epochs=40, warmup=0, p_clean=0.15),
    "framed-warm": T.DEFAULT_RECIPE,  # the chosen default: augment.FRAMED_SPEC, 8 warm-up epochs, 50 epochs
    "framed-warm-nols": replace(T.DEFAULT_RECIPE, name="framed-warm-nols", label_smoothing=0.0),
}


def cached(path: Path, make):
    if path.exists():
        return np.load(path)["a"].astype(np.float32)
    a = make()
    np.savez_compressed(path, a=a.astype(np.uint8))
    return a


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/bikes/train")
    ap.add_argument("--seed-model", type=Path, default=ROOT.parent / "shared/models/seed-notebook.h5")
    ap.add_argument("--recipes", default="seed-aug,composite")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--max-folds", type=int, default=0, help="run only the first N folds (quick looks)")
    ap.add_argument("--user-views", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bikewatch-recipes"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--card", type=Path, help="also merge the figures into this model card under 'kfold'")
    ap.add_argument("--from-json", type=Path, nargs="+", help="merge these earlier --json reports into --card; no training")
    args = ap.parse_args()
    if args.from_json:
        for path in args.from_json:
            merge_into_card(args.card, json.loads(path.read_text()))
        return 0
    args.cache.mkdir(parents=True, exist_ok=True)

    data = T.load_dataset(args.data)
    n = len(data)
    user = cached(args.cache / f"user{args.user_views}.npz",
                  lambda: make_views(T.load_sources(data.paths), args.user_views, 999, USER_SPEC))
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict = {"folds": args.folds, "seeds": seeds, "user_views": args.user_views, "recipes": {}}

    def measure(probs_clean: np.ndarray, probs_user: np.ndarray, probs_mirror: np.ndarray, idx: np.ndarray) -> dict:
        yu = np.repeat(data.y[idx], args.user_views)
        pu = probs_user.argmax(1)
        return {"clean": float((probs_clean.argmax(1) == data.y[idx]).mean()), "user": float((pu == yu).mean()),
                "mirror_flips": float((pu != probs_mirror.argmax(1)).mean())}

    if args.seed_model.exists():
        from bikewatch.inference.model import load_classifier, predict_files

        seed = load_classifier(args.seed_model)
        flat = user.reshape(-1, 64, 64, 3)
        pc, pu = predict_files(seed, list(data.x)), predict_files(seed, list(flat))
        pm = predict_files(seed, list(flat[:, :, ::-1]))
        m = measure(pc, pu, pm, np.arange(n))
        yu = np.repeat(data.y, args.user_views)
        m["ece_user"] = T.expected_calibration_error(pu, yu)
        report["seed-notebook.h5 (trained on all of train/)"] = m
        print("seed-notebook.h5 (has seen these bikes):", json.dumps(m), flush=True)

    for name in args.recipes.split(","):
        recipe = RECIPES[name]
        per_seed = []
        oof_user, oof_y = [], []
        t0 = time.time()
        for s in seeds:
            views = None
            if recipe is not None:
                views = cached(args.cache / f"train-{recipe.spec}-v{recipe.views}-s{s}.npz",
                               lambda: T.make_training_views(data, recipe.views, 1000 + s, recipe.spec))  # noqa: B023
            folds = T.stratified_folds(data.y, args.folds, s)
            if args.max_folds:
                folds = folds[: args.max_folds]
            fold_m = []
            for i, test_idx in enumerate(folds):
                train_idx = np.setdiff1d(np.arange(n), test_idx)
                if recipe is None:
                    model = T.fit(data.subset(train_idx), epochs=20, seed=s * 100 + i, verbose=0)
                    mirror = "none"
                else:
                    assert views is not None
                    model = T.fit_views(views[train_idx], data.y[train_idx], recipe, seed=s * 100 + i)
                    mirror = recipe.mirror
                xu = user[test_idx].reshape(-1, 64, 64, 3)
                pc = T.predict_keras(model, data.x[test_idx], mirror=mirror)
                pu = T.predict_keras(model, xu, mirror=mirror)
                pm = T.predict_keras(model, xu[:, :, ::-1], mirror=mirror)
                fm = measure(pc, pu, pm, test_idx)
                fold_m.append(fm)
                oof_user.append(pu)
                oof_y.append(np.repeat(data.y[test_idx], args.user_views))
                print(f"{name} seed {s} fold {i + 1}: {json.dumps(fm)} ({time.time() - t0:.0f}s)", flush=True)
            per_seed.append({k: float(np.mean([f[k] for f in fold_m])) for k in fold_m[0]})
        pu_all, y_all = np.concatenate(oof_user), np.concatenate(oof_y)
        temp = T.fit_temperature(pu_all, y_all)
        cal = T.apply_temperature(pu_all, temp)
        summary: dict[str, Any] = {k: {"mean": float(np.mean([p[k] for p in per_seed])),
                                       "sd": float(np.std([p[k] for p in per_seed])),
                                       "per_seed": [p[k] for p in per_seed]} for k in per_seed[0]}
        summary["temperature"] = temp
        summary["ece_user_before"] = T.expected_calibration_error(pu_all, y_all)
        summary["ece_user_after"] = T.expected_calibration_error(cal, y_all)
        for thr in (0.6, 0.7, 0.8):
            conf = cal.max(1)
            sure = conf >= thr
            summary[f"unsure_below_{thr}"] = {
                "share_unsure": float(1 - sure.mean()),
                "accuracy_of_the_rest": float((cal.argmax(1)[sure] == y_all[sure]).mean()) if sure.any() else None}
        summary["seconds"] = time.time() - t0
        report["recipes"][name] = summary
        print(name, json.dumps(summary), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.card:
        merge_into_card(args.card, report)
    return 0


def merge_into_card(path: Path, report: dict) -> None:
    card = json.loads(path.read_text())
    kfold = card.setdefault("kfold", {"how": " ".join(__doc__.split("\n\n")[1].split()), "recipes": {}})
    kfold.update({k: v for k, v in report.items() if k != "recipes"})
    kfold["recipes"].update(report["recipes"])
    path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
