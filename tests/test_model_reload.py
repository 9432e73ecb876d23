"""The running service switches models without a restart, and the CSV says which model sorted what."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
from PIL import Image

from harness import Daemon, wait_until


def _flipped_model(src: Path, dst: Path) -> None:
    """Same architecture, last layer's columns swapped: a different model with a different digest."""
    from bikewatch.inference.model import InputContract, load_classifier, save_model

    keras_model = load_classifier(src, backend="keras").keras_model
    weights = keras_model.get_weights()
    weights[-2] = weights[-2][:, ::-1].copy()
    weights[-1] = weights[-1][::-1].copy()
    keras_model.set_weights(weights)
    save_model(keras_model, dst, InputContract())


def _photo(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path, quality=90)


def test_model_file_replaced_or_sighup_switches_model(tmp_path: Path) -> None:
    from bikewatch.inference.model import default_model_path

    model = tmp_path / "current.keras"
    shutil.copy(default_model_path(), model)
    prom = tmp_path / "metrics" / "bikewatch.prom"
    prom.parent.mkdir()
    d = Daemon(tmp_path, settings={"model": str(model), "metrics_textfile": str(prom)}).start()
    try:
        _photo(d.inbox / "first.jpg", 1)
        wait_until(lambda: len(d.rows()) == 1, 30, what="first photo sorted")
        first_model = d.rows()[0]["model"]
        assert first_model.startswith("current@")

        # Replace the file atomically, as the README tells people to.
        staged = tmp_path / "staged.keras"
        _flipped_model(model, staged)
        os.replace(staged, model)
        switched = wait_until(lambda: d.events("model switched"), 30, what="model switched event")
        assert switched[0]["previous"] == first_model
        new_model = switched[0]["model"]
        assert new_model != first_model

        _photo(d.inbox / "second.jpg", 2)
        wait_until(lambda: len(d.rows()) == 2, 30, what="second photo sorted")
        second = d.rows()[1]
        assert second["model"] == new_model

        # A broken replacement is refused and the current model stays.
        broken = tmp_path / "broken.keras"
        broken.write_text("not a model")
        os.replace(broken, model)
        wait_until(lambda: d.events("model reload failed; keeping the current model"), 30,
                   what="reload failure logged")
        _photo(d.inbox / "third.jpg", 3)
        wait_until(lambda: len(d.rows()) == 3, 30, what="third photo sorted with the old model")
        assert d.rows()[2]["model"] == new_model

        # SIGHUP reloads on request (systemctl reload); the file is fixed first.
        _flipped_model(default_model_path(), staged)
        os.replace(staged, model)
        before = len(d.events("model switched"))
        d.signal(signal.SIGHUP)
        wait_until(lambda: len(d.events("model switched")) > before, 30, what="switch after SIGHUP")
        assert d.terminate() == 0

        # The node_exporter textfile tells the same story as the CSV.
        from prometheus_client.parser import text_string_to_metric_families

        families = {f.name: f for f in text_string_to_metric_families(prom.read_text())}
        photos = sum(s.value for s in families["bikewatch_photos"].samples if s.name == "bikewatch_photos_total")
        assert photos == 3
        infos = [s.labels.get("model") for s in families["bikewatch_model_info"].samples]
        assert infos and infos[-1].startswith("current@")
    finally:
        d.stop_quietly()


def test_a_photo_read_ahead_by_the_previous_model_is_classified_again_by_the_new_one(tmp_path: Path) -> None:
    """Read-ahead keeps probabilities with the model that made them; a switch before the claim discards them,
    and the claimed file is read and classified again, so no row carries the old model's verdict."""
    from bikewatch.decode.prepare import prepare
    from bikewatch.inference.model import default_model_path, load_classifier

    model = tmp_path / "current.keras"
    shutil.copy(default_model_path(), model)
    # A long settle: the photos are read and classified ahead while they wait, and the model
    # is replaced before they may be moved.
    d = Daemon(tmp_path, settings={"model": str(model), "settle_seconds": 12.0, "closed_settle_seconds": 12.0,
                                   "log_level": "debug"}).start()
    try:
        for i in range(2):
            _photo(d.inbox / f"p{i}.jpg", 10 + i)
        ahead = wait_until(lambda: [e for e in d.events("read ahead") if e["classified"] == 2], 30,
                           what="both photos classified while they settle")
        assert ahead and not d.rows()
        old_model = d.events("model loaded")[0]["model"]

        staged = tmp_path / "staged.keras"
        _flipped_model(model, staged)
        os.replace(staged, model)
        switched = wait_until(lambda: d.events("model switched"), 30, what="model switched event")
        new_model = switched[0]["model"]
        assert new_model != old_model
        assert not d.rows(), "the settle time was too short for this test: the photos went before the switch"

        rows = wait_until(lambda: d.rows() if len(d.rows()) == 2 else None, 60, what="both photos sorted")
        new = load_classifier(model)
        for row in rows:
            assert row["model"] == new_model
            placed = Path(row["destination"])
            prepared = prepare(placed, "k", max_pixels=100_000_000)
            assert prepared.array is not None
            expected = new.predict(prepared.array[None])[0]
            assert abs(float(row["p_mountain"]) - float(expected[0])) < 1e-4, (row, expected)
            assert abs(float(row["p_road"]) - float(expected[1])) < 1e-4, (row, expected)
        assert d.terminate() == 0
        stopped = d.events("stopped")[0]
        assert (stopped["read_ahead_used"], stopped["read_ahead_wasted"]) == (0, 2)  # both read again at the claim
    finally:
        d.stop_quietly()
