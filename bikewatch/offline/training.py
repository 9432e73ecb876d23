"""Training and evaluation: the seed's recipe, made reproducible and robust.

Data sets are class folders (``mountain/``, ``road/``) under one directory, so
bikewatch's own output folder is valid training data too: people correct the
sorting by moving files, then retrain on what they corrected.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bikewatch.clock import utc_now
from bikewatch.files import sha256_file, write_atomic
from bikewatch.inference.model import Classifier, InputContract, build_cnn, compile_cnn, save_model
from bikewatch.labels import CLASSES
from bikewatch.decode.preprocess import PreprocessError, is_image_name, preprocess_file

DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 32
DEFAULT_SEED = 1337


@dataclass(frozen=True)
class Dataset:
    """Preprocessed photos with integer labels (index into :data:`CLASSES`)."""

    paths: tuple[Path, ...]
    x: np.ndarray
    y: np.ndarray
    skipped: tuple[tuple[Path, str], ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Dataset":
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(tuple(self.paths[i] for i in idx), self.x[idx], self.y[idx])

    def fingerprint(self) -> str:
        """sha256 over (class, file name, bytes digest) so a model card names its data."""
        h = hashlib.sha256()
        for path, label in sorted(zip((str(p) for p in self.paths), self.y.tolist())):
            h.update(f"{CLASSES[label]}/{Path(path).name}\0".encode())
            h.update(bytes.fromhex(sha256_file(path)))
        return h.hexdigest()


def list_class_files(data_dir: Path) -> list[tuple[Path, int]]:
    """(path, label) for every image file under DATA_DIR/mountain and DATA_DIR/road."""
    data_dir = Path(data_dir)
    found = [d for d in CLASSES if (data_dir / d).is_dir()]
    if len(found) != len(CLASSES):
        missing = [d for d in CLASSES if d not in found]
        raise FileNotFoundError(f"{data_dir} must contain the class folders {list(CLASSES)}; missing {missing}")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASSES):
        for root, dirs, files in os.walk(data_dir / name):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            items += [(Path(root) / f, label) for f in sorted(files) if is_image_name(f) and not f.startswith(".")]
    return items


def load_dataset(data_dir: str | os.PathLike[str], *, workers: int | None = None) -> Dataset:
    """Preprocess every photo of the class folders, in parallel; unreadable ones are skipped and listed."""
    items = list_class_files(Path(data_dir))
    if not items:
        raise FileNotFoundError(f"no image files under {data_dir}/{{{','.join(CLASSES)}}}")

    def one(item: tuple[Path, int]) -> tuple[Path, int, np.ndarray | None, str]:
        try:
            return item[0], item[1], preprocess_file(item[0]), ""
        except PreprocessError as exc:
            return item[0], item[1], None, exc.reason

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2))) as pool:
        results = list(pool.map(one, items))
    good = [(p, lab, arr) for p, lab, arr, _ in results if arr is not None]
    skipped = tuple((p, why) for p, _, arr, why in results if arr is None)
    if not good:
        raise FileNotFoundError(f"no readable photos under {data_dir}")
    return Dataset(
        paths=tuple(p for p, _, _ in good),
        x=np.stack([a for _, _, a in good]),
        y=np.array([lab for _, lab, _ in good], dtype=np.int64),
        skipped=skipped,
    )


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with each class split by ``fraction``; pure and seeded."""
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction)) if fraction > 0 else 0
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    return np.array(sorted(train_idx), dtype=np.int64), np.array(sorted(val_idx), dtype=np.int64)


def stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """K disjoint index sets covering every sample, each with both classes spread evenly."""
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def make_augmenter(seed: int) -> Any:
    """What photo dumps contain that the 200 product shots do not: mirror images,
    off-centre framing, tighter crops, and other exposure. Applied only while training."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomTranslation(0.08, 0.08, fill_mode="nearest", seed=seed + 1),
            layers.RandomZoom((-0.15, 0.05), fill_mode="nearest", seed=seed + 2),
            layers.RandomBrightness(0.2, value_range=(0.0, 255.0), seed=seed + 3),
            layers.RandomContrast(0.2, seed=seed + 4),
        ],
        name="augment",
    )


def fit(
    train: Dataset,
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    augment: bool = True,
    initial: Any | None = None,
    learning_rate: float = 1e-3,
    verbose: int | str = "auto",
) -> Any:
    """Train the seed CNN (or fine-tune ``initial``) on ``train``; returns the Keras model."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = initial if initial is not None else build_cnn(rescale=True)
    compile_cnn(model, learning_rate=learning_rate)
    y = keras.utils.to_categorical(train.y, num_classes=len(CLASSES))
    ds = tf.data.Dataset.from_tensor_slices((train.x, y)).shuffle(len(train), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment:
        augmenter = make_augmenter(seed)
        ds = ds.map(lambda a, b: (tf.clip_by_value(augmenter(a, training=True), 0.0, 255.0), b))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")  # the Dataset is shuffled above
        model.fit(ds, epochs=epochs, verbose=verbose)
    return model


@dataclass(frozen=True)
class Metrics:
    accuracy: float
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    precision: dict[str, float]
    recall: dict[str, float]
    misclassified: list[dict[str, Any]]
    count: int

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "accuracy": self.accuracy,
            "confusion": {"labels": list(CLASSES), "rows_true_columns_predicted": self.confusion},
            "precision": self.precision,
            "recall": self.recall,
            "misclassified": self.misclassified,
        }


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, paths: Sequence[Path]) -> Metrics:
    """Accuracy, confusion matrix, per-class precision/recall and the misses; pure."""
    pred = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    n = len(CLASSES)
    conf = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(y_true, pred):
        conf[t, p] += 1
    precision: dict[str, float] = {}
    recall: dict[str, float] = {}
    for i, name in enumerate(CLASSES):
        col, row = conf[:, i].sum(), conf[i, :].sum()
        precision[name] = float(conf[i, i] / col) if col else 0.0
        recall[name] = float(conf[i, i] / row) if row else 0.0
    missed = [
        {"path": str(paths[i]), "true": CLASSES[int(y_true[i])], "predicted": CLASSES[int(pred[i])],
         "confidence": float(probs[i].max())}
        for i in map(int, np.flatnonzero(pred != y_true))
    ]
    accuracy = float((pred == y_true).mean()) if len(y_true) else 0.0
    return Metrics(accuracy, conf.tolist(), precision, recall, missed, int(len(y_true)))


def evaluate(classifier: Classifier, data: Dataset) -> Metrics:
    from bikewatch.inference.model import predict_files

    return compute_metrics(data.y, predict_files(classifier, list(data.x)), data.paths)


def evaluate_keras(model: Any, data: Dataset, *, mirror: str = "none") -> Metrics:
    """Metrics for a freshly trained Keras model (RGB 0..255 contract, ``mirror`` as it will be saved)."""
    probs = predict_keras(model, data.x, mirror=mirror)
    return compute_metrics(data.y, probs, data.paths)


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for name in ("bikewatch", "tensorflow", "keras", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "unknown"
    return out


def model_card(
    *,
    model_path: Path,
    contract: InputContract,
    data_dir: Path,
    train: Dataset,
    validation: Metrics | None,
    epochs: int,
    batch_size: int,
    seed: int,
    augment: bool,
    fingerprint: str,
    base_model: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "model": model_path.name,
        "created": utc_now("seconds"),
        "contract": contract.to_json(),
        "architecture": "seed CNN: Conv32x2-Pool-Conv32x2-Pool-Conv32-Pool-Flatten-Dropout0.25-Dense32-Dense16-Dense2",
        "training": {
            "data_dir": str(data_dir),
            "data_fingerprint_sha256": fingerprint,
            "samples": len(train),
            "per_class": {name: int((train.y == i).sum()) for i, name in enumerate(CLASSES)},
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "AdamW with cosine decay (see recipe)",
            "loss": "categorical_crossentropy with label smoothing (see recipe)",
            "augmentation": ("background segmented and replaced by synthetic scenes, aspect, scale, crop, rotation, "
                             "flip, colour, grey, darkening, blur, JPEG (bikewatch.offline.augment.TRAIN_SPEC)") if augment
                            else "horizontal flip only",
            "seed": seed,
            "fine_tuned_from": base_model,
        },
        "validation": validation.to_json() if validation else None,
        "libraries": library_versions(),
        **(extra or {}),
    }


def write_card(card: dict[str, Any], model_path: Path) -> Path:
    path = card_path(model_path)
    write_atomic(path, json.dumps(card, indent=2) + "\n")  # a reader sees the old card or the new one
    return path


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".card.json")


USER_VIEWS_PER_PHOTO = 4


def calibrate(model: Any, val: Dataset, *, mirror: str, seed: int) -> dict[str, Any]:
    """Fit a temperature on the validation photos and user-like views of them; ECE before/after."""
    from bikewatch.offline.augment import USER_SPEC, make_views

    user = make_views(load_sources(val.paths), USER_VIEWS_PER_PHOTO, seed + 99, USER_SPEC).reshape(-1, 64, 64, 3)
    x = np.concatenate([val.x, user])
    y = np.concatenate([val.y, np.repeat(val.y, USER_VIEWS_PER_PHOTO)])
    probs = predict_keras(model, x, mirror=mirror)
    t = fit_temperature(probs, y)
    cal = apply_temperature(probs, t)
    n = len(val)
    return {
        "temperature": t, "fitted_on": f"{n} held-out photos + {len(user)} user-like views of them",
        "ece_before": expected_calibration_error(probs, y), "ece_after": expected_calibration_error(cal, y),
        "accuracy_clean": float((probs[:n].argmax(1) == val.y).mean()),
        "accuracy_user_like": float((probs[n:].argmax(1) == y[n:]).mean()),
    }


def train_command(
    data_dir: Path,
    out: Path,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = DEFAULT_SEED,
    val_split: float = 0.2,
    augment: bool = True,
    base: Classifier | None = None,
    original: Path | None = None,
    log: Path | None = None,
    temperature: float | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Load, split, train (or fine-tune), calibrate, validate, save model and card; returns the card."""
    from dataclasses import replace

    recipe = replace(DEFAULT_RECIPE, batch_size=batch_size or DEFAULT_RECIPE.batch_size,
                     views=DEFAULT_RECIPE.views if augment else 0, epochs=epochs or DEFAULT_RECIPE.epochs)
    data = load_dataset(data_dir)
    for path, why in data.skipped:
        echo(f"skipped {path}: {why}")
    extra: dict[str, Any] = {"recipe": recipe.to_json()}
    if base is not None:
        if base.contract.channel_order != "RGB" or base.contract.scale != "0..255":
            raise ValueError("fine-tuning needs an RGB 0..255 model trained by bikewatch; retrain from scratch instead")
        from bikewatch.offline.finetune import corrected_paths, fine_tune, load_original

        before = evaluate(base, data)
        echo(f"before fine-tuning: accuracy {before.accuracy:.3f} on all {len(data)} photos in {data_dir}")
        orig = load_original(base, original, echo)
        model, report, train = fine_tune(base, data, corrected_paths(log), original=orig, recipe=recipe, seed=seed,
                                         epochs=epochs, echo=echo)
        contract = base.contract
        metrics = None
        after = evaluate_keras(model, data, mirror=contract.mirror)
        extra["fine_tuning"] = {"accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
                                "photos": len(data), **report}
        echo(f"after fine-tuning: accuracy {after.accuracy:.3f} on all {len(data)} photos in {data_dir}")
    else:
        train_idx, val_idx = stratified_split(data.y, val_split, seed)
        train, val = data.subset(train_idx), data.subset(val_idx)
        echo(f"training on {len(train)} photos, validating on {len(val)} ({data_dir})")
        views = make_training_views(train, recipe.views, seed, recipe.spec)
        model = fit_views(views, train.y, recipe, seed=seed, verbose=sys.stdout.isatty())
        contract = InputContract(mirror=recipe.mirror)  # type: ignore[arg-type]
        calibration: dict[str, Any]
        if temperature is not None:
            calibration = {"temperature": temperature, "fitted_on": "given (--temperature), e.g. the out-of-fold one "
                           "of benchmarks/recipes.py"}
        elif len(val):
            calibration = calibrate(model, val, mirror=recipe.mirror, seed=seed)
        else:
            calibration = {"temperature": 1.0, "fitted_on": "nothing: no validation split and no --temperature"}
        bake_temperature(model, float(calibration["temperature"]))
        extra["calibration"] = calibration
        echo(f"temperature {calibration['temperature']:.3f} ({calibration['fitted_on']})")
        metrics = evaluate_keras(model, val, mirror=recipe.mirror) if len(val) else None
    save_model(model, out, contract)
    card = model_card(
        model_path=out, contract=contract, data_dir=data_dir, train=train, validation=metrics,
        epochs=recipe.epochs, batch_size=recipe.batch_size, seed=seed, augment=augment, fingerprint=data.fingerprint(),
        base_model=base.identity if base else None, extra=extra,
    )
    write_card(card, out)
    if metrics:
        echo(f"validation accuracy {metrics.accuracy:.3f} on {metrics.count} held-out photos")
    echo(f"wrote {out} and {card_path(out)}")
    return card


def kfold_command(data_dir: Path, k: int, *, epochs: int | None, seed: int, echo: Any = print) -> dict[str, Any]:
    """K-fold cross-validation of the recipe: K fresh models, each tested on its held-out fold,
    as the photos are and as user-like views of them (:data:`bikewatch.offline.augment.USER_SPEC`)."""
    from dataclasses import replace

    from bikewatch.offline.augment import USER_SPEC, make_views

    recipe = replace(DEFAULT_RECIPE, epochs=epochs or DEFAULT_RECIPE.epochs)
    data = load_dataset(data_dir)
    smallest = min(int((data.y == i).sum()) for i in range(len(CLASSES)))
    if smallest < k:
        raise ValueError(f"--kfold {k} needs at least {k} photos of each class; the smallest class has {smallest}")
    views = make_training_views(data, recipe.views, seed, recipe.spec)
    user = make_views(load_sources(data.paths), USER_VIEWS_PER_PHOTO, seed + 99, USER_SPEC)
    folds = stratified_folds(data.y, k, seed)
    scores: list[float] = []
    user_scores: list[float] = []
    for i, test_idx in enumerate(folds):
        train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
        model = fit_views(views[train_idx], data.y[train_idx], recipe, seed=seed + i)
        m = evaluate_keras(model, data.subset(test_idx), mirror=recipe.mirror)
        pu = predict_keras(model, user[test_idx].reshape(-1, 64, 64, 3), mirror=recipe.mirror)
        ua = float((pu.argmax(1) == np.repeat(data.y[test_idx], USER_VIEWS_PER_PHOTO)).mean())
        scores.append(m.accuracy)
        user_scores.append(ua)
        echo(f"fold {i + 1}/{k}: accuracy {m.accuracy:.3f} on {m.count} photos, {ua:.3f} on "
             f"{len(pu)} user-like views of them")
    mean, std = float(np.mean(scores)), float(np.std(scores))
    echo(f"{k}-fold accuracy: {mean:.3f} +/- {std:.3f}; user-like views {np.mean(user_scores):.3f} "
         f"+/- {np.std(user_scores):.3f}")
    return {"k": k, "accuracies": scores, "mean": mean, "std": std, "user_like_accuracies": user_scores,
            "user_like_mean": float(np.mean(user_scores)), "user_like_std": float(np.std(user_scores)),
            "recipe": recipe.to_json()}


# --------------------------------------------------------------------------- the robust recipe


@dataclass(frozen=True)
class Recipe:
    """Everything around the fixed CNN that decides how well it carries over to users' photos.

    ``views``: augmented views per photo made once up front (:mod:`bikewatch.offline.augment`: the bike
    pasted on synthetic backgrounds, scaled, cropped, recoloured, darkened, blurred, re-compressed);
    each epoch shows every photo once, as its clean self or one of its views.
    """

    name: str = "framed-warm"
    views: int = 12
    epochs: int = 50
    warmup: int = 8  # first epochs on the photos as they are: without it some seeds never left chance
    batch_size: int = 16  # 10 steps an epoch on 160 photos: with 32, 40 epochs were too few steps to fit
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    p_clean: float = 0.2
    spec: str = "framed"  # bikewatch.offline.augment.SPECS
    mirror: str = "canonical"  # input contract: canonical horizontal orientation at inference

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


DEFAULT_RECIPE = Recipe()


def load_sources(paths: Sequence[Path]) -> list[Any]:
    """The photos at augmentation size with their segmented foreground (:class:`augment.Source`)."""
    from PIL import Image, ImageOps

    from bikewatch.offline.augment import SOURCE_SIZE, Source, load_source
    from bikewatch.decode.preprocess import to_rgb

    out = []
    for path in paths:
        with Image.open(path) as im:
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (SOURCE_SIZE, SOURCE_SIZE))
            im.load()
            oriented = ImageOps.exif_transpose(im) or im
            out.append(Source.from_rgb(load_source(to_rgb(oriented))))
    return out


def make_training_views(data: Dataset, per_photo: int, seed: int, spec: str = "train") -> np.ndarray:
    """(N, 1 + per_photo, 64, 64, 3): each photo's own input first, then its augmented views."""
    from bikewatch.offline.augment import make_views

    views = make_views(load_sources(data.paths), per_photo, seed, spec) if per_photo else np.zeros(
        (len(data), 0, 64, 64, 3), np.float32)
    return np.concatenate([data.x[:, None], views], axis=1)


def fit_views(
    views: np.ndarray,
    y: np.ndarray,
    recipe: Recipe = DEFAULT_RECIPE,
    *,
    seed: int = DEFAULT_SEED,
    initial: Any | None = None,
    weights: np.ndarray | None = None,
    epochs: int | None = None,
    learning_rate: float | None = None,
    on_epoch: Any | None = None,
    clean_share: np.ndarray | None = None,
    verbose: bool = False,
) -> Any:
    """Train (or fine-tune ``initial``) on pre-made views; AdamW with a cosine schedule and
    label smoothing. ``weights`` per photo scale its loss (corrections count more);
    ``on_epoch(epoch, model)`` may return True to stop early; ``clean_share`` per photo overrides
    ``recipe.p_clean`` (a correction is taught as the very photo it is, more often)."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.learning_rate if learning_rate is None else learning_rate
    model = initial if initial is not None else build_cnn(rescale=True)
    n = len(views)
    steps = max(1, -(-n // recipe.batch_size)) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=recipe.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
    )
    onehot = np.eye(len(CLASSES), dtype=np.float32)[y]
    sw = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    n_views = views.shape[1]
    for epoch in range(epochs):
        pick = rng.integers(1, n_views, n) if n_views > 1 else np.zeros(n, np.int64)
        share = recipe.p_clean if clean_share is None else clean_share
        pick[rng.random(n) < (1.0 if epoch < recipe.warmup else share)] = 0
        x = views[np.arange(n), pick]
        flip = rng.random(n) < 0.5  # the clean view too: every photo is seen both ways
        x[flip] = x[flip][:, :, ::-1]
        order = rng.permutation(n)
        model.fit(x[order], onehot[order], sample_weight=sw[order], batch_size=recipe.batch_size, epochs=1,
                  shuffle=False, verbose=0)
        if verbose:
            print(f"epoch {epoch + 1}/{epochs}", flush=True)
        if on_epoch is not None and on_epoch(epoch, model):
            break
    return model


def predict_keras(model: Any, x: np.ndarray, *, mirror: str = "canonical") -> np.ndarray:
    """Probabilities of a Keras model as the service would compute them (contract applied)."""
    contract = InputContract(mirror=mirror)  # type: ignore[arg-type]
    return np.asarray(model.predict(contract.adapt(x), batch_size=128, verbose=0))


# --------------------------------------------------------------------------- calibration


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the log loss of softmax(log p / T) on held-out predictions."""
    logp = np.log(np.clip(probs, 1e-7, 1.0))
    best_t, best = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 241)):
        z = logp / t
        z -= z.max(axis=1, keepdims=True)
        ll = -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean()
        if ll < best:
            best_t, best = float(t), ll
    return best_t


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.clip(probs, 1e-7, 1.0)) / t
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE over equal-width confidence bins (0.5..1 for two classes): mean |accuracy - confidence|."""
    conf = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    edges = np.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0.5 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(right[inside].mean() - conf[inside].mean())
    return float(ece)


def bake_temperature(model: Any, t: float) -> Any:
    """Divide the last Dense layer's weights and bias by T: softmax(z / T), same architecture."""
    last = model.layers[-1]
    kernel, bias = last.get_weights()
    last.set_weights([kernel / t, bias / t])
    return model
