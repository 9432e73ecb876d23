"""bikewatch.offline.training: the pure helpers, and ``bikewatch train`` end to end on a tiny generated data set."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import imagefactory as f
from bikewatch.cli import main
from bikewatch.inference.model import InputContract
from bikewatch.labels import CLASSES
from bikewatch.offline.training import (
    compute_metrics,
    list_class_files,
    load_dataset,
    stratified_folds,
    stratified_split,
)

# --------------------------------------------------------------------------- data set


def make_dataset(root: Path, per_class: int = 12, size: tuple[int, int] = (80, 60)) -> Path:
    """``per_class`` red-ish photos in mountain/, blue-ish in road/, all slightly different."""
    rng = np.random.default_rng(11)
    for label, base in (("mountain", (200, 40, 40)), ("road", (40, 40, 200))):
        for i in range(per_class):
            color = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in base)
            f.jpeg(root / label / f"{label}_{i}.jpg", size=size, color=color, quality=90)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real ``bikewatch train`` run (3 epochs), shared by the tests that inspect its output."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["train", str(tiny_data), "--out", str(out), "--epochs", "3", "--batch-size", "8"])
    return {"code": code, "out": out, "stdout": buf.getvalue()}


# --------------------------------------------------------------------------- bikewatch train


def test_train_writes_model_and_card(trained: dict) -> None:
    assert trained["code"] == 0, trained["stdout"]
    out: Path = trained["out"]
    card_file = out.with_name("tiny.card.json")
    assert out.is_file() and card_file.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.card.json", "tiny.keras"]  # no temp files
    assert f"wrote {out}" in trained["stdout"]
    assert "training on 20 photos, validating on 4" in trained["stdout"]


def test_train_card_describes_the_run(trained: dict, tiny_data: Path) -> None:
    card = json.loads(trained["out"].with_name("tiny.card.json").read_text())
    for key in ("model", "created", "contract", "architecture", "training", "validation", "libraries"):
        assert key in card, key
    assert card["model"] == "tiny.keras"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", card["created"])
    assert card["contract"]["classes"] == list(CLASSES)
    assert InputContract.from_json(card["contract"]) == InputContract(mirror="canonical")
    training = card["training"]
    assert training["epochs"] == 3 and training["batch_size"] == 8 and training["seed"] == 1337
    assert training["samples"] == 20 and training["per_class"] == {"mountain": 10, "road": 10}
    assert training["data_fingerprint_sha256"] == load_dataset(tiny_data).fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", training["data_fingerprint_sha256"])
    validation = card["validation"]
    assert validation["count"] == 4
    assert 0.0 <= validation["accuracy"] <= 1.0
    assert sum(map(sum, validation["confusion"]["rows_true_columns_predicted"])) == 4
    for lib in ("python", "tensorflow", "keras", "numpy", "pillow", "bikewatch"):
        assert lib in card["libraries"] and card["libraries"][lib] != "unknown", lib


def test_trained_model_loads_and_predicts(trained: dict, tiny_data: Path) -> None:
    from bikewatch.inference.model import load_classifier

    clf = load_classifier(trained["out"])
    assert clf.contract == InputContract(mirror="canonical")
    data = load_dataset(tiny_data)
    probs = clf.predict(data.x)
    assert probs.shape == (len(data), 2)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_train_reports_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path / "data", per_class=3, size=(64, 64))
    f.empty(data / "road" / "broken.jpg")
    (data / "road" / "notes.txt").write_text("not a photo")
    code = main(["train", str(data), "--out", str(tmp_path / "m.keras"), "--epochs", "1", "--val-split", "0",
                 "--no-augment"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"skipped .*broken\.jpg: empty file", out), out
    assert "notes.txt" not in out
    card = json.loads((tmp_path / "m.card.json").read_text())
    assert card["training"]["samples"] == 6 and card["validation"] is None
    assert card["training"]["augmentation"] == "horizontal flip only"


def test_train_with_a_missing_class_folder_is_a_usage_error(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    f.jpeg(tmp_path / "data" / "mountain" / "a.jpg")
    code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "m.keras"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bikewatch: error:" in err and "missing ['road']" in err, err
    assert not (tmp_path / "m.keras").exists()


def test_train_without_any_photos_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "mountain").mkdir(parents=True)
    (tmp_path / "data" / "road").mkdir()
    code = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "m.keras")])
    assert code == 2
    assert "no image files" in capsys.readouterr().err


def test_train_out_must_be_keras(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(tmp_path), "--out", str(tmp_path / "m.h5")])
    assert code == 2
    assert "--out must end in .keras" in capsys.readouterr().err


# --------------------------------------------------------------------------- data loading


def test_list_class_files_finds_images_recursively_and_skips_hidden(tmp_path: Path) -> None:
    f.jpeg(tmp_path / "mountain" / "a.jpg")
    f.png(tmp_path / "mountain" / "deeper" / "b.PNG")
    f.jpeg(tmp_path / "mountain" / ".hidden.jpg")
    f.jpeg(tmp_path / "mountain" / ".cache" / "c.jpg")
    f.jpeg(tmp_path / "road" / "d.jpeg")
    (tmp_path / "road" / "e.txt").write_text("x")
    f.jpeg(tmp_path / "rejected" / "z.jpg")
    found = [(p.relative_to(tmp_path).as_posix(), label) for p, label in list_class_files(tmp_path)]
    assert found == [("mountain/a.jpg", 0), ("mountain/deeper/b.PNG", 0), ("road/d.jpeg", 1)]


def test_fingerprint_depends_on_content_not_location(tmp_path: Path) -> None:
    a = make_dataset(tmp_path / "a", per_class=2, size=(32, 32))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    fa = load_dataset(a).fingerprint()
    assert load_dataset(b).fingerprint() == fa
    f.jpeg(b / "road" / "road_0.jpg", size=(32, 32), color=(1, 2, 3))
    assert load_dataset(b).fingerprint() != fa


# --------------------------------------------------------------------------- pure helpers


def test_stratified_split_is_disjoint_complete_and_per_class() -> None:
    y = np.array([0] * 10 + [1] * 8 + [0] * 3)
    train, val = stratified_split(y, 0.2, seed=1)
    assert set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(len(y)))
    assert list(train) == sorted(train) and list(val) == sorted(val)
    assert (y[val] == 0).sum() == 3 and (y[val] == 1).sum() == 2  # round(13*0.2), round(8*0.2)
    assert set(y[train]) == {0, 1} and set(y[val]) == {0, 1}


def test_stratified_split_is_seeded() -> None:
    y = np.array([0, 1] * 20)
    a = stratified_split(y, 0.25, seed=7)
    b = stratified_split(y, 0.25, seed=7)
    c = stratified_split(y, 0.25, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_stratified_split_with_no_validation() -> None:
    y = np.array([0, 0, 1, 1, 1])
    train, val = stratified_split(y, 0.0, seed=1)
    assert list(train) == [0, 1, 2, 3, 4] and val.size == 0


@pytest.mark.parametrize("k", [2, 3, 5])
def test_stratified_folds_partition_every_sample_with_both_classes(k: int) -> None:
    y = np.array([0] * 13 + [1] * 11)
    folds = stratified_folds(y, k, seed=3)
    assert len(folds) == k
    flat = np.concatenate(folds)
    assert sorted(flat.tolist()) == list(range(len(y)))  # disjoint and complete
    for fold in folds:
        assert set(y[fold]) == {0, 1}
    for label in (0, 1):
        counts = [(y[fold] == label).sum() for fold in folds]
        assert max(counts) - min(counts) <= 1, counts


def test_compute_metrics_on_a_hand_made_example() -> None:
    y_true = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    paths = [Path(f"p{i}.jpg") for i in range(5)]
    m = compute_metrics(y_true, probs, paths)
    assert m.count == 5
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.confusion == [[2, 1], [1, 1]]
    assert m.precision == pytest.approx({"mountain": 2 / 3, "road": 1 / 2})
    assert m.recall == pytest.approx({"mountain": 2 / 3, "road": 1 / 2})
    assert m.misclassified == [
        {"path": "p1.jpg", "true": "mountain", "predicted": "road", "confidence": pytest.approx(0.7)},
        {"path": "p4.jpg", "true": "road", "predicted": "mountain", "confidence": pytest.approx(0.55)},
    ]
    as_json = json.loads(json.dumps(m.to_json()))
    assert as_json["confusion"] == {"labels": ["mountain", "road"], "rows_true_columns_predicted": [[2, 1], [1, 1]]}


def test_compute_metrics_without_predictions_of_a_class() -> None:
    m = compute_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.8, 0.2]]), [Path("a"), Path("b")])
    assert m.precision == {"mountain": 0.5, "road": 0.0}
    assert m.recall == {"mountain": 1.0, "road": 0.0}


def test_compute_metrics_on_nothing() -> None:
    m = compute_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 2)), [])
    assert m.count == 0 and m.accuracy == 0.0 and m.confusion == [[0, 0], [0, 0]] and m.misclassified == []
