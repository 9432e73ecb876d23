"""LiteRT runs the model in the service, ``sort`` and ``classify``; TensorFlow only where it must.

The LiteRT model inside a ``.keras`` file (written by ``save_model`` through
``TFLiteConverter.from_keras_model``) gives Keras's probabilities for the same
photos; the commands that sort photos work with TensorFlow absent, and the ones
that need it say so in one line. "TensorFlow absent" is a real child process whose
``sitecustomize`` makes ``import tensorflow`` fail as on a runtime-only install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import imagefactory as f
from harness import REPO, Daemon, read_csv, wait_until
from photos import write_photos

from bikewatch.inference.model import (
    CONTRACT_ENTRY, InputContract, ModelError, build_cnn, default_model_path, load_classifier, predict_files,
    save_model,
)
from bikewatch.decode.preprocess import preprocess_file
from bikewatch.labels import CLASSES
from bikewatch.inference.runtime import TFLITE_ENTRY, read_tflite

WITHOUT_TF = "import sys\nsys.modules['tensorflow'] = None\nsys.modules['keras'] = None\n"


def top_labels(probs: np.ndarray) -> list[str]:
    """The class each row of probabilities (columns in CLASSES order) picks."""
    return [CLASSES[i] for i in np.argmax(probs, axis=1)]


def no_tf_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a child in which TensorFlow and Keras cannot be imported."""
    site = tmp_path / "no-tf-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(WITHOUT_TF)
    return {**os.environ, "PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def bikewatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bikewatch", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def photo_arrays(folder: Path) -> list[np.ndarray]:
    paths = [f.jpeg(folder / f"g{i}.jpg", image=f.gradient((400 + 37 * i, 300))) for i in range(4)]
    paths += [f.jpeg(folder / "red.jpg"), f.png(folder / "halves.png")]
    return [preprocess_file(p) for p in paths]


def test_the_embedded_default_carries_its_litert_form() -> None:
    with zipfile.ZipFile(default_model_path()) as zf:
        assert {CONTRACT_ENTRY, TFLITE_ENTRY} <= set(zf.namelist())
    lite = load_classifier()
    assert lite.backend == "litert" and lite.keras_model is None


def test_litert_and_keras_give_the_same_probabilities_for_the_default_model(tmp_path: Path) -> None:
    lite = load_classifier()
    keras_side = load_classifier(backend="keras")
    assert lite.identity == keras_side.identity  # one file, one identity in the CSV
    arrays = photo_arrays(tmp_path)
    a, b = predict_files(lite, arrays, batch_size=4), predict_files(keras_side, arrays, batch_size=4)
    assert a.shape == (len(arrays), 2)
    assert np.max(np.abs(a - b)) < 1e-5
    assert top_labels(a) == top_labels(b)


@pytest.mark.needs_shared
def test_litert_and_keras_agree_on_every_shared_test_photo(shared_test_photos: list[tuple[Path, str]]) -> None:
    lite = load_classifier()
    keras_side = load_classifier(backend="keras")
    arrays = [preprocess_file(p) for p, _ in shared_test_photos]
    a, b = predict_files(lite, arrays), predict_files(keras_side, arrays)
    assert np.max(np.abs(a - b)) < 1e-5


def test_a_freshly_saved_model_with_another_contract_agrees_in_both_runtimes(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(11)
    contract = InputContract(classes=("road", "mountain"), channel_order="BGR", scale="0..1")
    path = save_model(build_cnn(rescale=False), tmp_path / "m.keras", contract)
    lite, keras_side = load_classifier(path), load_classifier(path, backend="keras")
    assert lite.backend == "litert" and lite.contract == contract
    arrays = photo_arrays(tmp_path)
    for size in (1, 3, 6, 2):  # the interpreter is resized whenever the batch size changes
        a, b = lite.predict(np.stack(arrays[:size])), keras_side.predict(np.stack(arrays[:size]))
        assert a.shape == (size, 2) and np.max(np.abs(a - b)) < 1e-5


def test_a_bare_tflite_file_with_a_sidecar_contract_runs(tmp_path: Path) -> None:
    lite_bytes = read_tflite(default_model_path())
    assert lite_bytes is not None
    bare = tmp_path / "bikes.tflite"
    bare.write_bytes(lite_bytes)
    with pytest.raises(ModelError, match="no bikewatch input contract"):
        load_classifier(bare)
    (tmp_path / "bikes.tflite.contract.json").write_text(json.dumps(InputContract().to_json()))
    c = load_classifier(bare)
    arrays = photo_arrays(tmp_path)
    assert np.allclose(predict_files(c, arrays), predict_files(load_classifier(), arrays), atol=1e-6)
    with pytest.raises(ModelError, match="CPU only"):
        load_classifier(bare, backend="keras")


def test_a_keras_file_without_litert_form_asks_for_convert(tmp_path: Path) -> None:
    src = default_model_path()
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            if item.filename != TFLITE_ENTRY:
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(ModelError, match=r"bikewatch convert .*old\.keras"):
        load_classifier(old, backend="litert")
    assert load_classifier(old).backend == "keras"  # TensorFlow is here: auto falls back to it

    done = bikewatch("convert", str(old))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout.startswith(f"wrote {old}")
    converted = load_classifier(old, backend="litert")
    arrays = photo_arrays(tmp_path)
    assert np.allclose(predict_files(converted, arrays), predict_files(load_classifier(), arrays), atol=1e-6)


def test_classify_without_tensorflow_prints_only_its_table(tmp_path: Path) -> None:
    photo = f.jpeg(tmp_path / "bike.jpg", image=f.gradient())
    done = bikewatch("classify", str(photo), env=no_tf_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no absl, oneDNN, cuInit or XNNPACK lines
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[:2] == ["path", "label"] and lines[1].startswith(str(photo))


def test_commands_that_need_tensorflow_say_how_to_install_it(tmp_path: Path) -> None:
    env = no_tf_env(tmp_path)
    for args in (["train", str(tmp_path), "--out", str(tmp_path / "m.keras")], ["convert"],
                 ["evaluate", str(tmp_path), "--kfold", "3"]):
        done = bikewatch(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and "pip install 'bikewatch[train]'" in done.stderr, done.stderr
    done = bikewatch("classify", str(f.jpeg(tmp_path / "x.jpg")), "--model",
                     str(tmp_path / "seed.h5"), env=env)
    assert done.returncode == 2
    (tmp_path / "seed.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    done = bikewatch("classify", str(tmp_path / "x.jpg"), "--model", str(tmp_path / "seed.h5"), env=env)
    assert done.returncode == 2 and "bikewatch convert" in done.stderr and done.stderr.count("\n") == 1


def test_sort_without_tensorflow_sorts_everything(tmp_path: Path) -> None:
    dump, out = tmp_path / "dump", tmp_path / "sorted"
    write_photos(dump, 5)
    done = bikewatch("sort", str(dump), "--output", str(out), "--no-progress", env=no_tf_env(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "classifications.csv")
    assert len(rows) == 5 and {r["model"] for r in rows} == {load_classifier().identity}


@pytest.mark.slow
def test_the_daemon_runs_litert_without_tensorflow_and_without_onednn_settings(tmp_path: Path) -> None:
    env = no_tf_env(tmp_path)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    d = Daemon(tmp_path, env=env).start()
    try:
        staging = tmp_path / "staging"
        write_photos(staging, 4)
        for p in sorted(staging.iterdir()):
            os.rename(p, d.inbox / p.name)
        wait_until(lambda: len(d.rows()) == 4, timeout=60, what="4 CSV rows")
        loaded = d.events("model loaded")
        assert loaded and loaded[0]["backend"] == "litert"
        assert "LiteRT" in d.events("device")[0]["device"]
        assert not any("ONEDNN" in line for line in d.lines)
    finally:
        assert d.terminate() == 0


def test_classify_under_wx_gives_the_same_probabilities(tmp_path: Path) -> None:
    """W^X as MemoryDenyWriteExecute=yes imposes it (PR_SET_MDWE before exec): LiteRT needs no JIT."""
    from benchmarks.bench import deny_write_execute, wx_available

    why = wx_available()
    if why is not None:
        pytest.skip(why)
    paths = [f.jpeg(tmp_path / f"g{i}.jpg", image=f.gradient((500 + 50 * i, 300))) for i in range(3)]
    env = {**os.environ}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    done = subprocess.run([sys.executable, "-m", "bikewatch", "classify", "--format", "json", *map(str, paths)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=deny_write_execute)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    rows = json.loads(done.stdout)
    here = predict_files(load_classifier(), [preprocess_file(p) for p in paths])
    got = np.array([[r["p_mountain"], r["p_road"]] for r in rows])
    assert np.allclose(got, here, atol=1e-6)


def _custom_op_model() -> bytes:
    """A LiteRT model of the right shapes whose middle operator (Igamma) is a custom op: no kernel of LiteRT's."""
    import tensorflow as tf

    from bikewatch.inference.runtime import native_output_captured

    @tf.function(input_signature=[tf.TensorSpec([None, 64, 64, 3], tf.float32)])
    def f(x: tf.Tensor) -> tf.Tensor:
        m = tf.reshape(x[:, :2, :2, 0], [-1, 2, 2])
        d = tf.math.igamma(tf.ones_like(m) + 1.0, tf.abs(m) + 1.0)
        return tf.nn.softmax(tf.reshape(d, [-1, 4])[:, :2])

    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    converter.allow_custom_ops = True
    with native_output_captured():
        return bytes(converter.convert())


def test_a_model_with_operators_outside_litert_is_refused(tmp_path: Path) -> None:
    lite_bytes = _custom_op_model()
    bare = tmp_path / "custom.tflite"
    bare.write_bytes(lite_bytes)
    (tmp_path / "custom.tflite.contract.json").write_text(json.dumps(InputContract().to_json()))
    with pytest.raises(ModelError, match="outside LiteRT's built-ins: Igamma"):
        load_classifier(bare)
    # The same flatbuffer inside an otherwise good .keras: refused too, not run through Keras instead.
    hostile = tmp_path / "hostile.keras"
    with zipfile.ZipFile(default_model_path()) as zin, zipfile.ZipFile(hostile, "w") as zout:
        for item in zin.infolist():
            data = lite_bytes if item.filename == TFLITE_ENTRY else zin.read(item.filename)
            zout.writestr(item, data)
    with pytest.raises(ModelError, match="Igamma"):
        load_classifier(hostile)
