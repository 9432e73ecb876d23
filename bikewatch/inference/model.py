"""The seed CNN, its input contract, and safe loading of model files.

A model file carries its own *input contract* (class names in output order,
channel order, value scale), so nothing downstream assumes how a model was
trained: the daemon and every command call :meth:`Classifier.predict` with the
preprocessor's RGB 0..255 arrays and get probabilities keyed by class name.

Loading never runs code from a model file: the LiteRT flatbuffer inside a
``.keras`` file (or a bare ``.tflite``) runs LiteRT's built-in operators only
(:mod:`bikewatch.inference.runtime`); ``.keras`` files load into Keras with
``safe_mode=True``; legacy ``.h5`` files (the seed notebook's) are not
deserialised at all: the known architecture is built here and only the
weights are read from the file. Only the Keras paths import TensorFlow.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from bikewatch.decode.preprocess import SIZE
from bikewatch.files import replacing, sha256_file
from bikewatch.labels import CLASSES

CONTRACT_ENTRY = "bikewatch.json"
"""Name of the contract inside a ``.keras`` zip; Keras ignores entries it does not know."""

ChannelOrder = Literal["RGB", "BGR"]
Scale = Literal["0..1", "0..255"]
Mirror = Literal["none", "canonical"]


class ModelError(Exception):
    """A model file that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class InputContract:
    """How a model wants its input, and what its outputs mean."""

    classes: tuple[str, ...] = CLASSES
    channel_order: ChannelOrder = "RGB"
    scale: Scale = "0..255"
    size: int = SIZE
    mirror: Mirror = "none"
    """``canonical``: each image is put in its canonical horizontal orientation first
    (:func:`bikewatch.decode.preprocess.canonical_orientation`), so a photo and its mirror image
    get the same prediction by construction. Models before it have ``none``."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if sorted(self.classes) != sorted(CLASSES):
            raise ModelError(f"model classes must be {list(CLASSES)} in some order, not {list(self.classes)}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ModelError(f"channel_order must be RGB or BGR, not {self.channel_order!r}")
        if self.scale not in ("0..1", "0..255"):
            raise ModelError(f"scale must be '0..1' or '0..255', not {self.scale!r}")
        if self.size != SIZE:
            raise ModelError(f"model input size must be {SIZE}, not {self.size}")
        if self.mirror not in ("none", "canonical"):
            raise ModelError(f"mirror must be 'none' or 'canonical', not {self.mirror!r}")

    def adapt(self, batch: np.ndarray) -> np.ndarray:
        """Map preprocessor output (N, 64, 64, 3) RGB 0..255 to this model's input."""
        if self.mirror == "canonical":
            from bikewatch.decode.preprocess import canonical_orientation

            batch = canonical_orientation(batch)
        out = batch[..., ::-1] if self.channel_order == "BGR" else batch
        if self.scale == "0..1":
            out = out / np.float32(255.0)
        return np.ascontiguousarray(out, dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data.pop("extra")
        if self.mirror == "none":  # contracts written before the key existed read back the same
            data.pop("mirror")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "InputContract":
        try:
            return cls(
                classes=tuple(data["classes"]),
                channel_order=data.get("channel_order", "RGB"),
                scale=data.get("scale", "0..255"),
                size=int(data.get("size", SIZE)),
                mirror=data.get("mirror", "none"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed input contract: {exc}") from exc


SEED_CONTRACT = InputContract(classes=CLASSES, channel_order="BGR", scale="0..255")
"""The notebook fed OpenCV's BGR pixels as raw 0..255 floats; index 0 is mountain."""


def build_cnn(*, rescale: bool = True) -> Any:
    """The seed notebook's CNN, layer for layer, on 64x64x3 input.

    With ``rescale`` a Rescaling(1/255) layer comes first, so the saved model
    takes raw 0..255 pixels and nobody has to remember to divide.
    """
    import keras
    from keras import layers

    stack: list[Any] = [keras.Input(shape=(SIZE, SIZE, 3), name="image")]
    if rescale:
        stack.append(layers.Rescaling(1.0 / 255, name="rescale"))
    stack += [
        layers.Conv2D(32, 3, activation="relu"),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(strides=2),
        layers.Conv2D(32, 3, activation="relu"),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(strides=2),
        layers.Conv2D(32, 3, activation="relu"),
        layers.MaxPooling2D(strides=2),
        layers.Flatten(),
        layers.Dropout(0.25),
        layers.Dense(32, activation="relu"),
        layers.Dense(16, activation="relu"),
        layers.Dense(2, activation="softmax"),
    ]
    return keras.Sequential(stack, name="bikewatch_cnn")


def compile_cnn(model: Any, learning_rate: float = 1e-3) -> Any:
    """The seed's training recipe: Adam(1e-3) and categorical cross-entropy."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def default_model_path() -> Path:
    """The embedded model trained by ``bikewatch train`` on the shared train/ photos."""
    return Path(str(resources.files("bikewatch") / "default_model" / "bikes.keras"))


class Classifier:
    """A loaded model plus its contract; ``predict`` is the only thing callers need."""

    def __init__(
        self, keras_model: Any, contract: InputContract, *, path: Path, identity: str,
        runner: Callable[[np.ndarray], Any] | None = None, backend: str = "keras",
    ) -> None:
        self.keras_model = keras_model  # None under LiteRT: only training and `convert` need it
        self.contract = contract
        self.path = path
        self.identity = identity
        self.backend = backend  # "litert" or "keras": what runs predict()
        self._order = [contract.classes.index(name) for name in CLASSES]
        self._call = runner if runner is not None else _compiled_call(keras_model)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities, shape (N, 2), columns in :data:`CLASSES` order (mountain, road)."""
        if batch.ndim != 4 or batch.shape[1:] != (SIZE, SIZE, 3):
            raise ValueError(f"expected a (N, {SIZE}, {SIZE}, 3) batch, got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        probs = np.asarray(self._call(self.contract.adapt(batch)))
        return probs[:, self._order]


def _compiled_call(keras_model: Any) -> Callable[[np.ndarray], Any]:
    """One traced graph for any batch size: no per-call overhead of ``model.predict``.

    The concrete function, called with a tensor, also skips tf.function's argument binding
    and conversion on every call: 1.2 ms instead of 1.9 ms for a batch of one, most of it
    Python that holds the GIL the service's other threads need.
    """
    from bikewatch.inference.runtime import require_tensorflow

    tf = require_tensorflow("running a Keras model")

    # autograph=False: the body has no Python control flow to convert, and autograph would leave
    # an __autograph_generated_file*.py in the temp folder at every start of the service.
    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32)], reduce_retracing=True,
                 autograph=False)
    def call(x: Any) -> Any:
        return keras_model(x, training=False)

    concrete = call.get_concrete_function()
    return lambda batch: concrete(tf.convert_to_tensor(batch))  # adapt() gives float32, as traced


def model_identity(path: Path, digest: str) -> str:
    return f"{path.stem}@{digest[:12]}"


BackendChoice = Literal["auto", "litert", "keras"]


def load_classifier(path: str | os.PathLike[str] | None = None, backend: BackendChoice = "auto") -> Classifier:
    """Load a model file safely, or the embedded default when ``path`` is None.

    ``auto`` runs the file's LiteRT model when it has one (no TensorFlow imported), else Keras
    where TensorFlow is installed; ``litert`` insists on LiteRT; ``keras`` (GPU, training,
    ``convert``) loads the Keras layers.
    """
    from bikewatch.inference.runtime import TensorFlowMissing, read_tflite, tensorflow_installed

    model_path = Path(path) if path is not None else default_model_path()
    if not model_path.exists():
        raise ModelError(f"model file not found: {model_path}")
    if not model_path.is_file():
        raise ModelError(f"model path is not a file: {model_path}")
    try:
        digest = sha256_file(model_path)
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc.strerror or exc}") from exc
    with open(model_path, "rb") as fh:
        magic = fh.read(8)
    identity = model_identity(model_path, digest)
    is_zip, is_h5 = magic.startswith(b"PK"), magic.startswith(b"\x89HDF")
    lite = None if is_h5 else _read_tflite(model_path, read_tflite)
    if lite is None and not (is_zip or is_h5):
        raise ModelError(f"{model_path} is neither a .keras model nor a legacy .h5 weights file (nor a LiteRT .tflite)")
    if backend != "keras" and lite is not None:
        return _litert_classifier(model_path, lite, identity)
    if backend == "litert" or (backend == "auto" and not tensorflow_installed()):  # lite is None here
        kind = "legacy .h5 weights" if is_h5 else "a .keras model without a LiteRT model inside"
        raise ModelError(
            f"{model_path} is {kind}; LiteRT cannot run it: convert it once with "
            f"`bikewatch convert {model_path}` (needs TensorFlow: pip install 'bikewatch[train]')"
        )
    if not (is_zip or is_h5):
        raise ModelError(f"{model_path} is a LiteRT .tflite model: it runs on the CPU only (device = \"cpu\")")
    try:
        keras_model, contract = _load_keras(model_path) if is_zip else _load_legacy_h5(model_path)
    except TensorFlowMissing as exc:
        raise ModelError(str(exc)) from exc
    _check_shapes(keras_model, model_path)
    return Classifier(keras_model, contract, path=model_path, identity=identity)


def _read_tflite(path: Path, read: Callable[[Path], bytes | None]) -> bytes | None:
    try:
        return read(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from exc


def _litert_classifier(path: Path, lite: bytes, identity: str) -> Classifier:
    """A classifier that runs the LiteRT flatbuffer; the contract comes from the same file."""
    from bikewatch.inference.runtime import LiteRTRunner

    contract = read_contract(path)
    if contract is None:
        raise ModelError(
            f"{path} has no bikewatch input contract; add {path.name}.contract.json "
            '(e.g. {"classes": ["mountain", "road"], "channel_order": "RGB", "scale": "0..255"})'
        )
    try:
        runner = LiteRTRunner(lite, size=contract.size, where=str(path))
    except ValueError as exc:  # LiteRT raises ValueError for a malformed flatbuffer or unknown op
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(first if first.startswith(f"{path}: ") else f"cannot load {path} with LiteRT: {first}") from exc
    return Classifier(None, contract, path=path, identity=identity, runner=runner, backend="litert")


def read_contract(path: Path) -> InputContract | None:
    """The contract stored in a ``.keras`` zip, or beside any model as ``NAME.contract.json``."""
    sidecar = path.with_name(path.name + ".contract.json")
    if sidecar.is_file():
        try:
            return InputContract.from_json(json.loads(sidecar.read_text()))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{sidecar}: unreadable input contract: {exc}") from exc
    try:
        with zipfile.ZipFile(path) as zf:
            if CONTRACT_ENTRY in zf.namelist():
                return InputContract.from_json(json.loads(zf.read(CONTRACT_ENTRY)))
    except zipfile.BadZipFile:
        return None
    return None


def _load_keras(path: Path) -> tuple[Any, InputContract]:
    from bikewatch.inference.runtime import require_tensorflow

    require_tensorflow(f"loading {path.name} into Keras")
    import keras

    try:
        contract = read_contract(path)
    except (ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path}: unreadable input contract: {exc}") from exc
    if contract is None:
        raise ModelError(
            f"{path} has no bikewatch input contract; add {path.name}.contract.json "
            '(e.g. {"classes": ["mountain", "road"], "channel_order": "RGB", "scale": "0..255"})'
        )
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types; the user needs one line.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {path} safely: {first}") from exc
    return model, contract


def _load_legacy_h5(path: Path) -> tuple[Any, InputContract]:
    """The seed notebook's HDF5 file: same architecture, weights only, BGR 0..255."""
    from bikewatch.inference.runtime import require_tensorflow

    require_tensorflow(f"reading the legacy weights {path.name}")
    contract = read_contract(path) or SEED_CONTRACT
    model = build_cnn(rescale=False)  # the notebook scaled nothing; the contract says so
    try:
        model.load_weights(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} does not hold weights for the bikewatch CNN: {first}") from exc
    return model, contract


def _check_shapes(model: Any, path: Path) -> None:
    try:
        in_shape = tuple(model.input_shape)
        out_shape = tuple(model.output_shape)
    except (AttributeError, ValueError) as exc:
        raise ModelError(f"{path}: model has no single input/output ({exc})") from exc
    if in_shape[1:] != (SIZE, SIZE, 3):
        raise ModelError(f"{path}: model input must be (None, {SIZE}, {SIZE}, 3), not {in_shape}")
    if out_shape[1:] != (2,):
        raise ModelError(f"{path}: model must have 2 outputs (mountain, road), not {out_shape}")


def _inference_copy(model: Any) -> Any:
    """The same layers and weights without optimizer state: a third of the file size."""
    clean = type(model).from_config(model.get_config())  # uncompiled, unlike clone_model
    clean.set_weights(model.get_weights())
    return clean


def save_model(model: Any, path: str | os.PathLike[str], contract: InputContract) -> Path:
    """Write a ``.keras`` file with its contract and its LiteRT form inside, atomically (tmp + rename).

    The service runs the LiteRT entry (:data:`bikewatch.inference.runtime.TFLITE_ENTRY`) without TensorFlow;
    Keras (training, the GPU) reads the rest of the same file.
    """
    from bikewatch.inference.runtime import TFLITE_ENTRY, convert_keras

    target = Path(path)
    if target.suffix != ".keras":
        raise ModelError(f"models are saved as .keras files, not {target.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean = _inference_copy(model)
    lite = convert_keras(clean)
    # Durable: the service hot-reloads the model the moment its name changes; a power cut
    # must not leave the new name on a file whose bytes never reached the disk.
    with replacing(target, durable=True, suffix=".keras") as tmp:  # Keras saves only to NAME.keras
        clean.save(tmp)
        with zipfile.ZipFile(tmp, "a") as zf:
            zf.writestr(CONTRACT_ENTRY, json.dumps(contract.to_json(), indent=2))
            zf.writestr(TFLITE_ENTRY, lite)
    return target


def convert_model(source: str | os.PathLike[str] | None, out: str | os.PathLike[str] | None = None) -> Path:
    """Rewrite a model (``.keras`` or the seed's ``.h5``) as a ``.keras`` with its LiteRT form inside.

    ``bikewatch convert MODEL``; without ``out`` a ``.keras`` is rewritten in place and an ``.h5``
    goes beside it as ``NAME.keras``. Same weights, same contract; needs TensorFlow.
    """
    src = Path(source) if source is not None else default_model_path()
    target = Path(out) if out is not None else src.with_suffix(".keras")
    classifier = load_classifier(src, backend="keras")
    return save_model(classifier.keras_model, target, classifier.contract)


def predict_files(classifier: Classifier, arrays: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Probabilities for many preprocessed arrays, in fixed-size batches."""
    out = [classifier.predict(np.stack(arrays[i : i + batch_size])) for i in range(0, len(arrays), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)
