"""Training and evaluation: the seed's recipe, made reproducible and robust.

Data sets are class folders (``mountain/``, ``road/``) under one directory, so
bikewatch's own output folder is valid training data too: people correct the
sorting by moving files, then retrain on what they corrected.
"""

from __future__ import annotations

import datetime as dt
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

from bikewatch.model import CLASSES, Classifier, InputContract, build_cnn, compile_cnn, save_model
from bikewatch.preprocess import PreprocessError, is_image_name, preprocess_file

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
            h.update(hashlib.sha256(Path(path).read_bytes()).digest())
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
    from bikewatch.model import predict_files

    return compute_metrics(data.y, predict_files(classifier, list(data.x)), data.paths)


def evaluate_keras(model: Any, data: Dataset) -> Metrics:
    """Metrics for a freshly trained Keras model (RGB 0..255 contract)."""
    probs = np.asarray(model.predict(data.x, batch_size=64, verbose=0))
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
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "contract": contract.to_json(),
        "architecture": "seed CNN: Conv32x2-Pool-Conv32x2-Pool-Conv32-Pool-Flatten-Dropout0.25-Dense32-Dense16-Dense2",
        "training": {
            "data_dir": str(data_dir),
            "data_fingerprint_sha256": fingerprint,
            "samples": len(train),
            "per_class": {name: int((train.y == i).sum()) for i, name in enumerate(CLASSES)},
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "Adam(learning_rate=1e-3)",
            "loss": "categorical_crossentropy",
            "augmentation": "horizontal flip, shift 8%, zoom -15%..+5%, brightness 20%, contrast 20%" if augment else "none",
            "seed": seed,
            "fine_tuned_from": base_model,
        },
        "validation": validation.to_json() if validation else None,
        "libraries": library_versions(),
        **(extra or {}),
    }


def write_card(card: dict[str, Any], model_path: Path) -> Path:
    path = card_path(model_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".card.json")


def train_command(
    data_dir: Path,
    out: Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = DEFAULT_SEED,
    val_split: float = 0.2,
    augment: bool = True,
    base: Classifier | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Load, split, train, validate, save model and card; returns the card."""
    import keras

    data = load_dataset(data_dir)
    for path, why in data.skipped:
        echo(f"skipped {path}: {why}")
    train_idx, val_idx = stratified_split(data.y, val_split, seed)
    train, val = data.subset(train_idx), data.subset(val_idx)
    echo(f"training on {len(train)} photos, validating on {len(val)} ({data_dir})")
    initial = None
    before: Metrics | None = None
    if base is not None:
        if base.contract.channel_order != "RGB" or base.contract.scale != "0..255":
            raise ValueError("fine-tuning needs an RGB 0..255 model trained by bikewatch; retrain from scratch instead")
        initial = keras.models.clone_model(base.keras_model)
        initial.set_weights(base.keras_model.get_weights())
        before = evaluate(base, data)
        echo(f"before fine-tuning: accuracy {before.accuracy:.3f} on all {len(data)} photos in {data_dir}")
    model = fit(train, epochs=epochs, batch_size=batch_size, seed=seed, augment=augment, initial=initial)
    metrics = evaluate_keras(model, val) if len(val) else None
    contract = InputContract()
    save_model(model, out, contract)
    extra: dict[str, Any] = {}
    if before is not None:
        after = evaluate_keras(model, data)
        extra["fine_tuning"] = {"accuracy_before": before.accuracy, "accuracy_after": after.accuracy, "photos": len(data)}
        echo(f"after fine-tuning: accuracy {after.accuracy:.3f} on all {len(data)} photos in {data_dir}")
    card = model_card(
        model_path=out, contract=contract, data_dir=data_dir, train=train, validation=metrics, epochs=epochs,
        batch_size=batch_size, seed=seed, augment=augment, fingerprint=data.fingerprint(),
        base_model=base.identity if base else None, extra=extra,
    )
    write_card(card, out)
    if metrics:
        echo(f"validation accuracy {metrics.accuracy:.3f} on {metrics.count} held-out photos")
    echo(f"wrote {out} and {card_path(out)}")
    return card


def kfold_command(data_dir: Path, k: int, *, epochs: int, seed: int, echo: Any = print) -> dict[str, Any]:
    """The seed's K-fold cross-validation: K fresh models, each tested on its held-out fold."""
    data = load_dataset(data_dir)
    smallest = min(int((data.y == i).sum()) for i in range(len(CLASSES)))
    if smallest < k:
        raise ValueError(f"--kfold {k} needs at least {k} photos of each class; the smallest class has {smallest}")
    folds = stratified_folds(data.y, k, seed)
    scores: list[float] = []
    for i, test_idx in enumerate(folds):
        train_idx = np.setdiff1d(np.arange(len(data)), test_idx)
        model = fit(data.subset(train_idx), epochs=epochs, seed=seed + i, verbose=0)
        m = evaluate_keras(model, data.subset(test_idx))
        scores.append(m.accuracy)
        echo(f"fold {i + 1}/{k}: accuracy {m.accuracy:.3f} on {m.count} photos")
    mean, std = float(np.mean(scores)), float(np.std(scores))
    echo(f"{k}-fold accuracy: {mean:.3f} +/- {std:.3f}")
    return {"k": k, "accuracies": scores, "mean": mean, "std": std}
