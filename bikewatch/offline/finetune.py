"""``bikewatch train OUTPUT --fine-tune --log CSV``: learn people's corrections without forgetting.

Fine-tuning on the output folder alone teaches the model the 100-odd photos of one run and
makes it forget the 200 it was trained on (measured: 12 of 20 corrections learned, 3 photos
lost elsewhere). So the fine-tune trains on the *original* training photos together with the
output folder, gives each corrected photo a larger weight (the corrections are few, and they
are exactly what the model got wrong), starts from the base model at a lower learning rate,
and watches a held-out part of the original photos after every epoch: it keeps the epoch that
learned the most corrections without doing worse on that held-out part than the base model.

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
    # the corrections together weigh about a fifth of everything else (a few photos must count,
    # but a run full of corrections, all in the model's error direction, must not tilt it)
    weight = float(np.clip(0.25 * (len(train) - n_corr) / max(n_corr, 1), 1.0, 10.0))
    weights = np.where(train_corr, weight, 1.0).astype(np.float32)
    echo(f"fine-tune: {len(train)} photos ({n_corr} corrections weighted x{weight:.1f}); guarding against "
         f"forgetting on {guard}")

    views = make_training_views(train, recipe.views, seed, recipe.spec)
    corr_x, corr_y = train.x[train_corr], train.y[train_corr]
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

    def on_epoch(epoch: int, m: Any) -> bool:
        now = {"corrections": _acc(m, corr_x, corr_y, mirror), "held_out": _acc(m, held_x, held_y, mirror)}
        kept = not len(held_y) or now["held_out"] >= before["held_out"] - tolerance
        if kept and (now["corrections"], now["held_out"]) > (best["corrections"], best["held_out"]):
            best.update(epoch=epoch + 1, weights=m.get_weights(), **now)
        echo(f"  epoch {epoch + 1}: corrections {now['corrections']:.3f}, held-out {now['held_out']:.3f}"
             + ("" if kept else " (worse than before: not kept)"))
        return bool(best["corrections"] >= 1.0 and kept and epoch >= 2)

    ft = replace(recipe, learning_rate=recipe.learning_rate / 4, warmup=0)
    fit_views(views, train.y, ft, seed=seed, initial=model, weights=weights, epochs=epochs or 25, on_epoch=on_epoch,
              clean_share=np.where(train_corr, 0.5, recipe.p_clean))
    model.set_weights(best["weights"])
    report = {
        "photos": len(train), "corrections_in_training": n_corr, "correction_weight": weight,
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

