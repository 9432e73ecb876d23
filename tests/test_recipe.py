"""The robust recipe's parts: mirror canonicalisation, background segmentation and views,
calibration, and a fine-tune that learns corrections without forgetting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

import imagefactory
from bikewatch.offline.augment import TRAIN_SPEC, USER_SPEC, Source, background_mask, make_view, make_views
from bikewatch.inference.model import InputContract, build_cnn, load_classifier, save_model
from bikewatch.decode.preprocess import canonical_orientation, mirror_statistic, preprocess_file
from bikewatch.offline.training import (
    Recipe,
    apply_temperature,
    bake_temperature,
    expected_calibration_error,
    fit_temperature,
    fit_views,
    load_dataset,
)

# --------------------------------------------------------------------------- mirror invariance


def test_mirror_statistic_is_exactly_antisymmetric() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (40, 64, 64, 3)).astype(np.float32)
    assert np.array_equal(mirror_statistic(x[:, :, ::-1]), -mirror_statistic(x))


def test_canonical_orientation_gives_an_image_and_its_mirror_the_same_array() -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (40, 64, 64, 3)).astype(np.float32)
    x[0] = 128  # symmetric: statistic 0, nothing to choose
    x[1] = x[1] + x[1][:, ::-1]  # symmetric columns
    x[2, :, :32] = 10
    x[2, :, 32:] = 10  # statistic 0 but asymmetric after this:
    x[2, 5, 3], x[2, 7, 60] = 200, 200  # same column-moment on both sides
    canon = canonical_orientation(x)
    assert np.array_equal(canon, canonical_orientation(x[:, :, ::-1]))
    assert np.array_equal(canonical_orientation(canon), canon)  # idempotent
    for a, c in zip(x, canon):  # each output is the image or its mirror
        assert np.array_equal(c, a) or np.array_equal(c, a[:, ::-1])


def test_canonical_contract_predicts_identically_for_a_mirrored_photo(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    path = save_model(build_cnn(), tmp_path / "m.keras", InputContract(mirror="canonical"))
    clf = load_classifier(path, backend="keras")  # keras_model is used below
    assert clf.contract.mirror == "canonical"
    photo = imagefactory.save(tmp_path / "a.png", imagefactory.halves((300, 180), imagefactory.RED, imagefactory.BLUE))
    with Image.open(photo) as im:
        mirrored = imagefactory.save(tmp_path / "b.png", ImageOps.mirror(im))
    x = np.stack([preprocess_file(photo), preprocess_file(mirrored)])
    probs = clf.predict(x)
    assert np.array_equal(probs[0], probs[1])
    plain = load_classifier(save_model(clf.keras_model, tmp_path / "n.keras", InputContract()))
    assert not np.array_equal(*plain.predict(x))  # without the contract the untrained CNN does tell them apart


def test_contract_without_mirror_key_is_none_and_bad_values_are_refused() -> None:
    from bikewatch.inference.model import ModelError

    assert InputContract.from_json({"classes": ["mountain", "road"]}).mirror == "none"
    assert InputContract.from_json(InputContract(mirror="canonical").to_json()).mirror == "canonical"
    with pytest.raises(ModelError, match="mirror"):
        InputContract(mirror="sideways")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- views


def studio_shot() -> np.ndarray:
    """A dark 'bike' (two rings and a bar) on white, with white inside the rings."""
    im = Image.new("RGB", (192, 120), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for cx in (50, 142):
        d.ellipse([cx - 35, 25, cx + 35, 95], outline=(20, 20, 20), width=6)
    d.line([50, 60, 142, 60], fill=(200, 30, 30), width=8)
    return np.asarray(im)


def test_background_mask_takes_the_white_around_and_inside_the_wheels_not_the_bike() -> None:
    rgb = studio_shot()
    bg = background_mask(rgb)
    assert bg[0, 0] and bg[60, 10] and bg[60, 50 - 20]  # outside, and inside a wheel
    assert not bg[60, 96] and not bg[60, 50 - 33]  # the bar and a tyre


def test_views_are_seeded_in_range_and_vary() -> None:
    src = Source.from_rgb(studio_shot())
    a = make_views([src], 6, seed=1)
    b = make_views([src], 6, seed=1)
    assert a.shape == (1, 6, 64, 64, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255
    assert len({v.tobytes() for v in a[0]}) == 6
    rng = np.random.default_rng(0)
    for spec in (TRAIN_SPEC, USER_SPEC):
        # over many views the backgrounds are mostly not white: the corner pixel tells
        corners = [make_view(src, rng, spec)[0, 0].min() for _ in range(30)]
        assert sum(c < 220 for c in corners) >= 10


# --------------------------------------------------------------------------- calibration


def test_fit_temperature_recovers_an_overconfident_models_temperature() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(0, 2, (4000, 2))
    p_true = apply_temperature(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1.0)
    y = (rng.random(4000) < p_true[:, 1]).astype(np.int64)
    overconfident = apply_temperature(p_true, 1 / 3)  # logits tripled
    t = fit_temperature(overconfident, y)
    assert 2.6 < t < 3.4
    assert expected_calibration_error(apply_temperature(overconfident, t), y) < expected_calibration_error(
        overconfident, y) / 2


def test_bake_temperature_is_softmax_over_t(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(1)
    model = build_cnn()
    x = np.random.default_rng(2).uniform(0, 255, (8, 64, 64, 3)).astype(np.float32)
    before = np.asarray(model.predict(x, verbose=0))
    after = np.asarray(bake_temperature(model, 2.5).predict(x, verbose=0))
    assert np.allclose(after, apply_temperature(before, 2.5), atol=1e-5)


# --------------------------------------------------------------------------- fine-tune


def colour_set(root: Path, specs: dict[str, list[tuple[int, int, int]]], n: int) -> Path:
    rng = np.random.default_rng(5)
    for label, colours in specs.items():
        for c in colours:
            for i in range(n):
                col = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in c)
                imagefactory.png(root / label / f"{label}_{c[0]}_{c[1]}_{c[2]}_{i}.png", color=col, size=(72 + i, 48))
    return root


@pytest.mark.slow
def test_fine_tune_learns_the_corrections_and_keeps_the_rest(tmp_path: Path) -> None:
    """Base: red = mountain, blue = road. The output folder holds green photos the base filed
    wrongly, corrected by hand; after fine-tuning green is learned and red/blue stay right."""
    from bikewatch.offline.finetune import fine_tune

    orig = load_dataset(colour_set(tmp_path / "orig", {"mountain": [(200, 40, 40)], "road": [(40, 40, 200)]}, 10))
    recipe = Recipe(views=0, epochs=12, batch_size=8, p_clean=1.0, learning_rate=4e-3)
    model = fit_views(orig.x[:, None], orig.y, recipe, seed=1)
    base = load_classifier(save_model(model, tmp_path / "base.keras", InputContract(mirror="canonical")),
                          backend="keras")  # fine-tuning needs the Keras layers
    assert (base.predict(orig.x).argmax(1) == orig.y).all()
    green = colour_set(tmp_path / "g", {"x": [(40, 200, 40)]}, 6)
    wrong = int(base.predict(np.stack([preprocess_file(p) for p in sorted((green / "x").iterdir())])).argmax(1)[0])
    right_label = ("mountain", "road")[1 - wrong]
    out = colour_set(tmp_path / "out", {"mountain": [(190, 50, 50)], "road": [(50, 50, 190)]}, 4)
    for p in sorted((green / "x").iterdir()):
        p.rename(out / right_label / p.name)
    output = load_dataset(out)
    corrected = {p.resolve() for p in output.paths if "_40_200_40_" in p.name}
    assert len(corrected) == 6

    new, report, train = fine_tune(base, output, corrected, original=orig, recipe=recipe, seed=2, epochs=15,
                                   echo=lambda *_: None)
    assert report["before"]["corrections"] == 0.0
    assert report["after"]["corrections"] >= 0.9
    assert report["after"]["held_out"] >= report["before"]["held_out"]
    fresh = load_dataset(colour_set(tmp_path / "fresh", {"mountain": [(210, 30, 30)], "road": [(30, 30, 210)]}, 3))
    from bikewatch.offline.training import predict_keras

    assert (predict_keras(new, fresh.x).argmax(1) == fresh.y).all()
    assert report["corrections_in_training"] == 6 and report["correction_repeats"] >= 1
    assert report["held_out_photos"] >= 2 and len(train) == len(output) + len(orig) - report["held_out_photos"]


def test_evaluate_kfold_reports_clean_and_user_like_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bikewatch.cli import main

    data = colour_set(tmp_path / "d", {"mountain": [(200, 40, 40)], "road": [(40, 40, 200)]}, 4)
    assert main(["evaluate", str(data), "--kfold", "2", "--epochs", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "fold 1/2" in out and "user-like views" in out
    result = json.loads(out[out.index("\n{") + 1:])
    assert result["k"] == 2 and len(result["accuracies"]) == 2 and len(result["user_like_accuracies"]) == 2
    assert all(0.0 <= a <= 1.0 for a in result["accuracies"] + result["user_like_accuracies"])
    assert result["recipe"]["epochs"] == 1
