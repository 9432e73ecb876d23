"""``bikewatch train OUTPUT --fine-tune --log CSV``: learn people's corrections without forgetting.

Fine-tuning on the output folder alone teaches the model the 100-odd photos of one run and
makes it forget the 200 it was trained on. So the fine-tune trains on the *original* training
photos together with the output folder, starts from the base model at half the recipe's
learning rate, and shows each corrected photo several times an epoch (the corrections together
about as often as everything else), each time as another augmented view of itself: up-weighting
them instead (x1.8 each) learned only 22 of 36 in a simulated round, oversampling learned all
36. After every epoch it measures the corrections and a held-out part of the original photos
(with user-like views of them): it keeps the epoch that got the most corrections right without
doing worse on that held-out part than the base model, and stops once all are right.

Without the original photos (``--original`` not given and the base model's card names a
folder that is not here) the held-out part comes from the uncorrected photos of the output
folder instead; the command says so, since those are the model's own guesses and only a
weaker guard against forgetting.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bikewatch.inference.model import Classifier
from bikewatch.labels import CLASSES
from bikewatch.offline.training import (
    Dataset,
    Recipe,
    load_dataset,
    make_training_views,
    predict_keras,
    stratified_split,
)

HELD_OUT = 0.15
"""Share of the original photos kept back to detect forgetting."""
EPOCHS = 30
"""At most this many fine-tuning epochs; it stops as soon as every correction is right."""
CORRECTION_SHARE = 1.0
"""The corrections together are shown about as often as all the other training photos."""
MAX_REPEATS = 12
"""No correction is shown more than this many times an epoch (a run with very few of them)."""
LR_SCALE = 0.5
"""Fine-tuning learning rate as a share of the recipe's (AdamW, cosine decay, no warm-up)."""


def original_data_dir(base: Classifier, explicit: Path | None) -> Path | None:
    """``--original`` if given, else the training folder the base model's card names, if it is here."""
    if explicit is not None:
        return explicit
    card = base.path.with_name(base.path.stem + ".card.json")
    try:
        named = json.loads(card.read_text())["training"]["data_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    candidates = [Path(named)]
    if not Path(named).is_absolute():  # the embedded card names it relative to the project root
        candidates.append(Path(__file__).resolve().parents[2] / named)
    return next((c for c in candidates if (c / CLASSES[0]).is_dir() and (c / CLASSES[1]).is_dir()), None)


def correction_repeats(others: int, corrections: int, share: float = CORRECTION_SHARE) -> int:
    """How many times an epoch each correction is shown: the corrections together about ``share``
    times as often as the ``others``, at least once, at most :data:`MAX_REPEATS` times."""
    if corrections <= 0:
        return 1
    return int(np.clip(round(share * others / corrections), 1, MAX_REPEATS))


def concat(*parts: Dataset) -> Dataset:
    return Dataset(tuple(p for d in parts for p in d.paths), np.concatenate([d.x for d in parts]),
                   np.concatenate([d.y for d in parts]))


def _acc(model: Any, x: np.ndarray, y: np.ndarray, mirror: str) -> float:
    return float((predict_keras(model, x, mirror=mirror).argmax(1) == y).mean()) if len(y) else float("nan")


def fine_tune(
    base: Classifier,
    output: Dataset,
    corrected: set[Path],
    *,
    original: Dataset | None,
    recipe: Recipe,
    seed: int,
    epochs: int | None = None,
    echo: Any = print,
    share: float = CORRECTION_SHARE,
    lr_scale: float = LR_SCALE,
) -> tuple[Any, dict[str, Any], Dataset]:
    """The fine-tuned Keras model, a before/after report, and the photos it was trained on."""
    import keras

    from bikewatch.offline.augment import USER_SPEC, make_views
    from bikewatch.offline.training import fit_views, load_sources

    mirror = base.contract.mirror
    is_corr = np.array([p.resolve() in corrected for p in output.paths], dtype=bool)
    if original is not None:
        tr, ho = stratified_split(original.y, HELD_OUT, seed)
        train, held = concat(original.subset(tr), output), original.subset(ho)
        train_corr = np.concatenate([np.zeros(len(tr), bool), is_corr])
        guard = f"{len(held)} held-out photos of the original training data"
    else:
        rest = np.flatnonzero(~is_corr)
        tr_r, ho_r = (stratified_split(output.y[rest], HELD_OUT, seed) if len(rest) >= 8
                      else (np.arange(len(rest)), np.zeros(0, np.int64)))
        keep = np.sort(np.concatenate([rest[tr_r], np.flatnonzero(is_corr)]))
        train, held = output.subset(keep), output.subset(rest[ho_r])
        train_corr = is_corr[keep]
        guard = f"{len(held)} uncorrected photos of the output folder (the original training data is not here)"
        echo("fine-tune: the original training photos are not at hand (give --original DIR); training on the output "
             "folder alone, which forgets more")
    n_corr = int(train_corr.sum())
    # oversampled, not up-weighted: a correction repeated R times is seen R times an epoch, each
    # time as another augmented view of itself (or its mirror), so the few photos people corrected
    # count without one heavy gradient step per photo
    repeats = correction_repeats(len(train) - n_corr, n_corr, share)
    echo(f"fine-tune: {len(train)} photos ({n_corr} corrections, each shown {repeats}x an epoch); guarding against "
         f"forgetting on {guard}")

    views = make_training_views(train, recipe.views, seed, recipe.spec)
    corr_x, corr_y = train.x[train_corr], train.y[train_corr]
    idx = np.concatenate([np.arange(len(train)), np.repeat(np.flatnonzero(train_corr), repeats - 1)])
    if len(held):
        user = make_views(load_sources(held.paths), 2, seed + 7, USER_SPEC).reshape(-1, 64, 64, 3)
        held_x = np.concatenate([held.x, user])
        held_y = np.concatenate([held.y, np.repeat(held.y, 2)])
    else:
        held_x, held_y = np.zeros((0, 64, 64, 3), np.float32), np.zeros(0, np.int64)

    if base.keras_model is None:
        raise ValueError("fine-tuning needs the model's Keras layers: load it with load_classifier(..., backend='keras')")
    model = keras.models.clone_model(base.keras_model)
    model.set_weights(base.keras_model.get_weights())
    before = {"corrections": _acc(model, corr_x, corr_y, mirror), "held_out": _acc(model, held_x, held_y, mirror)}
    best: dict[str, Any] = {"epoch": 0, "weights": model.get_weights(), **before}

    # "no worse than before" on the held-out part, give or take one photo (itself and its 2 views)
    tolerance = 3.0 / len(held_y) if len(held_y) else 0.0

    def score(m: dict[str, Any]) -> tuple[float, float]:
        """Photos right, corrections and held-out ones counted alike; then the corrections."""
        right = m["corrections"] * len(corr_y) + (m["held_out"] * len(held_y) if len(held_y) else 0.0)
        return round(right, 6), m["corrections"]

    def on_epoch(epoch: int, m: Any) -> bool:
        now = {"corrections": _acc(m, corr_x, corr_y, mirror), "held_out": _acc(m, held_x, held_y, mirror)}
        kept = not len(held_y) or now["held_out"] >= before["held_out"] - tolerance
        if kept and score(now) > score(best):
            best.update(epoch=epoch + 1, weights=m.get_weights(), **now)
        echo(f"  epoch {epoch + 1}: corrections {now['corrections']:.3f}, held-out {now['held_out']:.3f}"
             + ("" if kept else " (worse than before: not kept)"))
        # done when every correction is right and the held-out part is no worse at all
        return bool(now["corrections"] >= 1.0 and epoch >= 2
                    and (not len(held_y) or now["held_out"] >= before["held_out"]))

    ft = replace(recipe, learning_rate=recipe.learning_rate * lr_scale, warmup=0)
    clean = np.where(train_corr, 0.5, recipe.p_clean)[idx]
    fit_views(views[idx], train.y[idx], ft, seed=seed, initial=model, epochs=epochs or EPOCHS, on_epoch=on_epoch,
              clean_share=clean)
    model.set_weights(best["weights"])
    report = {
        "photos": len(train), "corrections_in_training": n_corr, "correction_repeats": repeats,
        "original_data": original is not None, "guard": guard, "held_out_photos": len(held),
        "kept_epoch": best["epoch"], "held_out_tolerance": tolerance,
        "before": before, "after": {"corrections": best["corrections"], "held_out": best["held_out"]},
    }
    echo(f"fine-tune: corrections {before['corrections']:.3f} -> {best['corrections']:.3f}, held-out "
         f"{before['held_out']:.3f} -> {best['held_out']:.3f} (kept epoch {best['epoch']})")
    if best["epoch"] == 0:
        echo("fine-tune: no epoch learned corrections without doing worse on the held-out part; the new model is "
             "the base model unchanged (nothing forgotten, nothing learned)")
    return model, report, train


def corrected_paths(log: Path | None) -> set[Path]:
    """Where the photos people moved to the other class folder are now (resolved)."""
    if log is None:
        return set()
    from bikewatch.offline.corrections import find_corrections_in_log

    return {c.path.resolve() for c in find_corrections_in_log(log).corrections if c.current in CLASSES}


def load_original(base: Classifier, explicit: Path | None, echo: Any = print) -> Dataset | None:
    where = original_data_dir(base, explicit)
    if where is None:
        return None
    echo(f"fine-tune: original training photos from {where}")
    return load_dataset(where)

