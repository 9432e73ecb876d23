"""bikewatch.inference.model: the seed architecture, input contracts, and safe loading of real model files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from bikewatch.inference.model import (
    CONTRACT_ENTRY,
    SEED_CONTRACT,
    Classifier,
    InputContract,
    ModelError,
    build_cnn,
    load_classifier,
    predict_files,
    save_model,
)
from bikewatch.decode.preprocess import SIZE, preprocess_file
from bikewatch.labels import CLASSES

keras = pytest.importorskip("keras")
layers = keras.layers

# The seed notebook's model, layer by layer: (type, filters, kernel, units, activation, rate).
SEED_LAYERS = [
    ("Conv2D", 32, (3, 3), None, "relu", None),
    ("Conv2D", 32, (3, 3), None, "relu", None),
    ("MaxPooling2D", None, None, None, None, None),
    ("Conv2D", 32, (3, 3), None, "relu", None),
    ("Conv2D", 32, (3, 3), None, "relu", None),
    ("MaxPooling2D", None, None, None, None, None),
    ("Conv2D", 32, (3, 3), None, "relu", None),
    ("MaxPooling2D", None, None, None, None, None),
    ("Flatten", None, None, None, None, None),
    ("Dropout", None, None, None, None, 0.25),
    ("Dense", None, None, 32, "relu", None),
    ("Dense", None, None, 16, "relu", None),
    ("Dense", None, None, 2, "softmax", None),
]


def top_labels(probs: np.ndarray) -> list[str]:
    """The class each row of probabilities (columns in CLASSES order) picks."""
    return [CLASSES[i] for i in np.argmax(probs, axis=1)]


def describe(layer_type: str, config: dict) -> tuple:
    kernel = config.get("kernel_size")
    return (
        layer_type,
        config.get("filters"),
        tuple(kernel) if kernel is not None else None,
        config.get("units"),
        config.get("activation"),
        config.get("rate"),
    )


def layer_list(model) -> list[tuple]:
    return [describe(type(layer).__name__, layer.get_config()) for layer in model.layers]


def pool_geometry(model) -> list[tuple]:
    return [
        (tuple(layer.get_config()["pool_size"]), tuple(layer.get_config()["strides"]), layer.get_config()["padding"])
        for layer in model.layers if type(layer).__name__ == "MaxPooling2D"
    ]


def batch(*colors: tuple[int, int, int]) -> np.ndarray:
    """(N, 64, 64, 3) float32 RGB 0..255, one solid colour per image."""
    return np.stack([np.broadcast_to(np.float32(c), (SIZE, SIZE, 3)) for c in colors]).astype(np.float32)


def random_batch(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def add_contract(path: Path, contract: dict) -> None:
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(CONTRACT_ENTRY, json.dumps(contract))


RGB_CONTRACT = {"classes": ["mountain", "road"], "channel_order": "RGB", "scale": "0..255"}


# --------------------------------------------------------------------------- architecture


def test_build_cnn_is_the_seed_architecture_with_rescaling_first() -> None:
    model = build_cnn()
    first, rest = model.layers[0], model.layers[1:]
    assert type(first).__name__ == "Rescaling"
    assert first.get_config()["scale"] == pytest.approx(1 / 255)
    assert first.get_config()["offset"] == 0
    assert [describe(type(x).__name__, x.get_config()) for x in rest] == SEED_LAYERS
    assert pool_geometry(model) == [((2, 2), (2, 2), "valid")] * 3
    assert all(x.get_config()["padding"] == "valid" for x in rest if type(x).__name__ == "Conv2D")
    assert tuple(model.input_shape) == (None, SIZE, SIZE, 3)
    assert tuple(model.output_shape) == (None, 2)


def test_build_cnn_without_rescale_has_no_rescaling_layer() -> None:
    model = build_cnn(rescale=False)
    assert layer_list(model) == SEED_LAYERS


def test_build_cnn_weights_fit_the_seed_parameter_count() -> None:
    # 64x64 input, valid 3x3 convs: 62-60-30-28-26-13-11-5 -> flatten 5*5*32 = 800 -> 32 -> 16 -> 2
    expected = (3 * 3 * 3 * 32 + 32) + 3 * (3 * 3 * 32 * 32 + 32) + (3 * 3 * 32 * 32 + 32) \
        + (800 * 32 + 32) + (32 * 16 + 16) + (16 * 2 + 2)
    assert build_cnn().count_params() == expected


@pytest.mark.needs_shared
def test_build_cnn_matches_the_architecture_stored_in_the_seed_file(shared: Path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(shared / "models" / "seed-notebook.h5", "r") as fh:
        config = json.loads(fh.attrs["model_config"])
    stored = config["config"]["layers"]
    stored = [x for x in stored if x["class_name"] != "InputLayer"]
    assert [describe(x["class_name"], x["config"]) for x in stored] == SEED_LAYERS
    assert layer_list(build_cnn(rescale=False)) == [describe(x["class_name"], x["config"]) for x in stored]


# --------------------------------------------------------------------------- contracts


def test_input_contract_adapt_rgb_0_255_is_identity() -> None:
    x = batch((10, 20, 30))
    out = InputContract().adapt(x)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out, x)


def test_input_contract_adapt_bgr_reverses_channels() -> None:
    out = InputContract(channel_order="BGR").adapt(batch((10, 20, 30)))
    assert out.flags.c_contiguous
    assert np.array_equal(out[0, 5, 7], [30, 20, 10])


def test_input_contract_adapt_0_1_scales() -> None:
    out = InputContract(scale="0..1").adapt(batch((255, 51, 0)))
    assert out.dtype == np.float32
    assert np.allclose(out[0, 0, 0], [1.0, 0.2, 0.0])


def test_input_contract_adapt_bgr_and_0_1_together_does_not_touch_the_input() -> None:
    x = batch((255, 51, 0))
    out = InputContract(channel_order="BGR", scale="0..1").adapt(x)
    assert np.allclose(out[0, 0, 0], [0.0, 0.2, 1.0])
    assert np.array_equal(x[0, 0, 0], [255, 51, 0])


def test_seed_contract_is_bgr_0_255_mountain_first() -> None:
    assert SEED_CONTRACT.classes == ("mountain", "road") == CLASSES
    assert SEED_CONTRACT.channel_order == "BGR" and SEED_CONTRACT.scale == "0..255"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"classes": ("mountain", "city")}, "classes"),
        ({"classes": ("mountain",)}, "classes"),
        ({"channel_order": "GBR"}, "channel_order"),
        ({"scale": "0..65535"}, "scale"),
        ({"size": 32}, "size"),
    ],
)
def test_invalid_contracts_are_model_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(ModelError, match=words):
        InputContract(**kwargs)


def test_contract_json_round_trip_and_malformed_json() -> None:
    c = InputContract(classes=("road", "mountain"), channel_order="BGR", scale="0..1")
    assert c.to_json() == {"classes": ["road", "mountain"], "channel_order": "BGR", "scale": "0..1", "size": SIZE}
    assert InputContract.from_json(json.loads(json.dumps(c.to_json()))) == c
    with pytest.raises(ModelError, match="malformed input contract"):
        InputContract.from_json({"channel_order": "RGB"})


# --------------------------------------------------------------------------- Classifier.predict


def red_detector():
    """A tiny model whose raw output 0 is ~1 for red-channel-bright input and 0.5 for red-free input."""
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.GlobalAveragePooling2D(),
                              layers.Dense(2, activation="softmax")])
    model.layers[-1].set_weights([np.array([[0.05, -0.05], [0, 0], [0, 0]], np.float32), np.zeros(2, np.float32)])
    return model


def test_predict_columns_follow_classes_even_when_the_model_is_road_first(tmp_path: Path) -> None:
    model = red_detector()
    red, blue = batch((255, 0, 0), (0, 0, 255))
    raw = np.asarray(model(np.stack([red, blue])))
    assert raw[0, 0] > 0.99 and np.allclose(raw[1], 0.5)  # the detector works as designed

    mountain_first = Classifier(model, InputContract(classes=("mountain", "road")), path=tmp_path, identity="m")
    road_first = Classifier(model, InputContract(classes=("road", "mountain")), path=tmp_path, identity="r")
    pm = mountain_first.predict(np.stack([red, blue]))
    pr = road_first.predict(np.stack([red, blue]))
    assert np.allclose(pm, raw, atol=1e-6)
    assert np.allclose(pr, raw[:, ::-1], atol=1e-6)
    assert top_labels(pm)[0] == "mountain"
    assert top_labels(pr)[0] == "road"


def test_predict_applies_the_channel_order(tmp_path: Path) -> None:
    model = red_detector()
    bgr = Classifier(model, InputContract(channel_order="BGR"), path=tmp_path, identity="b")
    p = bgr.predict(batch((255, 0, 0), (0, 0, 255)))
    # RGB red reaches the model as (0, 0, 255): nothing in channel 0; RGB blue reaches it as red.
    assert np.allclose(p[0], 0.5, atol=1e-6)
    assert p[1, 0] > 0.99


def test_predict_checks_the_batch_shape_and_handles_empty_batches(tmp_path: Path) -> None:
    c = Classifier(red_detector(), InputContract(), path=tmp_path, identity="x")
    with pytest.raises(ValueError, match="expected a"):
        c.predict(np.zeros((SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match="expected a"):
        c.predict(np.zeros((1, 32, 32, 3), np.float32))
    out = c.predict(np.zeros((0, SIZE, SIZE, 3), np.float32))
    assert out.shape == (0, 2)


def test_predict_files_batches_give_the_same_result_as_one_call(tmp_path: Path) -> None:
    c = Classifier(red_detector(), InputContract(), path=tmp_path, identity="x")
    x = random_batch(7)
    assert np.allclose(predict_files(c, list(x), batch_size=3), c.predict(x), atol=1e-6)
    assert predict_files(c, []).shape == (0, 2)


# --------------------------------------------------------------------------- save and load


def test_save_model_and_load_classifier_round_trip(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    model = build_cnn()
    contract = InputContract(classes=("road", "mountain"), channel_order="BGR", scale="0..255")
    path = save_model(model, tmp_path / "sub" / "m.keras", contract)
    assert path == tmp_path / "sub" / "m.keras" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["m.keras"]  # no temporary file left behind

    loaded = load_classifier(path)
    assert loaded.contract == contract
    assert loaded.path == path
    assert loaded.identity.startswith("m@") and len(loaded.identity) == len("m@") + 12
    assert loaded.backend == "litert" and loaded.keras_model is None  # the service's runtime, no TensorFlow
    in_keras = load_classifier(path, backend="keras")
    assert in_keras.identity == loaded.identity and in_keras.contract == contract
    assert layer_list(in_keras.keras_model) == layer_list(model)

    x = random_batch(5)
    raw = np.asarray(model(contract.adapt(x), training=False))
    assert np.allclose(loaded.predict(x), raw[:, ::-1], atol=1e-5)
    assert np.allclose(in_keras.predict(x), raw[:, ::-1], atol=1e-5)


def test_save_model_wants_a_keras_suffix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"\.keras"):
        save_model(build_cnn(), tmp_path / "m.h5", InputContract())
    assert not (tmp_path / "m.h5").exists()


def test_identity_changes_with_the_file_content(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    a = load_classifier(save_model(build_cnn(), tmp_path / "a" / "m.keras", InputContract()))
    keras.utils.set_random_seed(2)
    b = load_classifier(save_model(build_cnn(), tmp_path / "b" / "m.keras", InputContract()))
    assert a.identity != b.identity


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found") as info:
        load_classifier(tmp_path / "nope.keras")
    assert "nope.keras" in str(info.value)


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a file"):
        load_classifier(tmp_path)


def test_text_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelError, match="neither a .keras model nor a legacy .h5"):
        load_classifier(path)


def test_zip_that_is_not_a_keras_model(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hello.txt", "hi")
        zf.writestr(CONTRACT_ENTRY, json.dumps(RGB_CONTRACT))
    with pytest.raises(ModelError, match="cannot load .* safely"):
        load_classifier(path)


def test_h5_without_matching_weights(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("something", data=np.zeros(3))
    with pytest.raises(ModelError, match="does not hold weights for the bikewatch CNN"):
        load_classifier(path)


def test_unreadable_sidecar_next_to_an_h5_is_a_model_error(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "seed.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("something", data=np.zeros(3))
    (tmp_path / "seed.h5.contract.json").write_text("{not json")
    with pytest.raises(ModelError, match="contract"):
        load_classifier(path)


def lambda_model(marker: Path):
    # The lambda's only job is to leave a trace when it runs. Built from source so that the
    # path is a constant inside the code object (no closure), as a malicious file would have it.
    code = eval(f"lambda x: (open({str(marker)!r}, 'a').close(), x)[1]")  # noqa: S307
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.Lambda(code, output_shape=(SIZE, SIZE, 3)),
                             layers.GlobalAveragePooling2D(), layers.Dense(2, activation="softmax")])


def test_lambda_layer_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "lambda-ran"
    path = tmp_path / "evil.keras"
    lambda_model(marker).save(path)
    add_contract(path, RGB_CONTRACT)
    marker.unlink(missing_ok=True)

    with pytest.raises(ModelError) as info:
        load_classifier(path)
    message = str(info.value)
    assert "safely" in message and "lambda" in message.lower(), message
    assert "\n" not in message
    assert not marker.exists()

    # Control: an unsafe load of the same file yields a model that runs the embedded code,
    # so the refusal above is what kept it from running.
    unsafe = keras.saving.load_model(path, compile=False, safe_mode=False)
    unsafe(random_batch(1))
    assert marker.exists()


def test_wrong_input_shape_is_refused(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((32, 32, 3)), layers.Flatten(), layers.Dense(2, activation="softmax")])
    path = save_model(model, tmp_path / "small.keras", InputContract())
    with pytest.raises(ModelError, match=r"model input must be \(None, 64, 64, 3\)") as info:
        load_classifier(path)
    assert "32, 32, 3" in str(info.value)


def test_three_outputs_are_refused(tmp_path: Path) -> None:
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.GlobalAveragePooling2D(),
                              layers.Dense(3, activation="softmax")])
    path = save_model(model, tmp_path / "three.keras", InputContract())
    with pytest.raises(ModelError, match="must have 2 outputs") as info:
        load_classifier(path)
    assert "3" in str(info.value).split("not")[-1]


def test_keras_file_without_contract_says_how_to_add_one(tmp_path: Path) -> None:
    keras.utils.set_random_seed(3)
    model = build_cnn()
    path = tmp_path / "plain.keras"
    model.save(path)
    with pytest.raises(ModelError) as info:
        load_classifier(path)
    message = str(info.value)
    assert "no bikewatch input contract" in message
    assert "plain.keras.contract.json" in message
    assert '"classes"' in message and '"channel_order"' in message and '"scale"' in message

    # Following the advice works: the sidecar contract is read.
    advice = json.loads(message[message.index("{"): message.rindex("}") + 1])
    (tmp_path / "plain.keras.contract.json").write_text(json.dumps({**advice, "classes": ["road", "mountain"]}))
    loaded = load_classifier(path)
    assert loaded.contract == InputContract(classes=("road", "mountain"))
    x = random_batch(3)
    assert np.allclose(loaded.predict(x), np.asarray(model(x, training=False))[:, ::-1], atol=1e-5)


def test_unreadable_contract_is_a_model_error(tmp_path: Path) -> None:
    path = save_model(build_cnn(), tmp_path / "m.keras", InputContract())
    (tmp_path / "m.keras.contract.json").write_text("{not json")
    with pytest.raises(ModelError, match="contract"):
        load_classifier(path)


# --------------------------------------------------------------------------- the real models


def preprocessed(paths: list[Path]) -> np.ndarray:
    return np.stack([preprocess_file(p) for p in paths])


@pytest.mark.needs_shared
def test_seed_h5_loads_and_classifies_every_test_photo(seed_classifier, shared_test_photos) -> None:
    assert len(shared_test_photos) == 11
    assert seed_classifier.contract == SEED_CONTRACT
    assert seed_classifier.identity.startswith("seed-notebook@")
    x = preprocessed([p for p, _ in shared_test_photos])
    labels = top_labels(seed_classifier.predict(x))
    assert labels == [label for _, label in shared_test_photos]


@pytest.mark.needs_shared
def test_seed_h5_is_fed_raw_bgr_pixels(seed_classifier, shared_test_photos) -> None:
    x = preprocessed([p for p, _ in shared_test_photos])
    by_hand = np.asarray(seed_classifier.keras_model(np.ascontiguousarray(x[..., ::-1]), training=False))
    assert np.allclose(seed_classifier.predict(x), by_hand, atol=1e-6)


@pytest.mark.needs_shared
def test_seed_h5_contract_sidecar_is_honoured(shared: Path, shared_test_photos, tmp_path: Path) -> None:
    # A sidecar that says index 0 is road turns every answer around: the contract is what decides.
    # (Swapping only the channel order would not show this: on these photos the seed model's
    # probabilities are saturated and barely move between BGR and RGB input.)
    copy = tmp_path / "seed.h5"
    copy.write_bytes((shared / "models" / "seed-notebook.h5").read_bytes())
    (tmp_path / "seed.h5.contract.json").write_text(
        json.dumps({"classes": ["road", "mountain"], "channel_order": "BGR", "scale": "0..255"}))
    swapped = load_classifier(copy)
    assert swapped.contract.classes == ("road", "mountain")
    x = preprocessed([p for p, _ in shared_test_photos])
    wrong = sum(a != b for a, (_, b) in zip(top_labels(swapped.predict(x)), shared_test_photos))
    assert wrong == 11


@pytest.mark.needs_shared
def test_default_model_classifies_every_test_photo(default_classifier, shared_test_photos) -> None:
    assert default_classifier.contract == InputContract(mirror="canonical")  # trained by bikewatch: RGB 0..255
    x = preprocessed([p for p, _ in shared_test_photos])
    labels = top_labels(default_classifier.predict(x))
    assert labels == [label for _, label in shared_test_photos]


@pytest.mark.needs_shared
def test_default_model_handles_mirrored_photos(default_classifier, shared_test_photos, tmp_path: Path) -> None:
    mirrored = []
    for path, _ in shared_test_photos:
        with Image.open(path) as im:
            out = tmp_path / (path.stem + "-mirrored.png")
            ImageOps.mirror(ImageOps.exif_transpose(im).convert("RGB")).save(out)
            mirrored.append(out)
    labels = top_labels(default_classifier.predict(preprocessed(mirrored)))
    correct = sum(a == b for a, (_, b) in zip(labels, shared_test_photos))
    assert correct >= 10, labels
    assert labels == top_labels(default_classifier.predict(preprocessed([p for p, _ in shared_test_photos])))


def test_the_service_model_leaves_nothing_in_the_temp_folder(tmp_path: Path) -> None:
    """A service killed many times must not litter TMPDIR.

    Autograph writes a .py file per traced function and removes it only at a clean exit;
    os._exit stands in for SIGKILL, an OOM kill or a power cut.
    """
    code = ("import os, numpy as np\nfrom bikewatch.inference.model import load_classifier\n"
            "print(load_classifier().predict(np.zeros((2, 64, 64, 3), np.float32)).shape, flush=True)\n"
            "os._exit(0)")
    env = {**os.environ, "TMPDIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "(2, 2)" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []
