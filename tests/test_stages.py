"""The data path in-process: claim -> decode -> infer -> decide -> deliver -> ledger, without a daemon.

A small fake classifier with the real one's interface (``predict`` on a float32 batch,
``identity``, ``contract``) answers by each image's mean colour, so every label is known in
advance; everything else is real: temp folders, PNGs made with Pillow, the decode worker
processes, the work area, the journals, the CSV. The end-to-end tests (test_daemon,
test_guarantees...) still run the real model in a real child process.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import structlog
from PIL import Image

from bikewatch.config import Settings
from bikewatch.decision import decide_batch
from bikewatch.decode.pool import DecodePool
from bikewatch.decode.prepare import Prepared
from bikewatch.decode.stage import DecodeStage
from bikewatch.files import sha256_file
from bikewatch.inference.model import InputContract
from bikewatch.inference.stage import InferenceStage
from bikewatch.logs import get_logger
from bikewatch.service.accounting import Accounting
from bikewatch.service.backoff import Backoff
from bikewatch.service.claimer import InFlight
from bikewatch.service.deliverer import Deliverer
from bikewatch.service.loop import Service
from bikewatch.service.metrics import Metrics
from bikewatch.service.mode import Mode
from bikewatch.service.readahead import Usable
from bikewatch.service.recovery import Recoverer
from bikewatch.service.systemd import Notifier
from bikewatch.store.claim import claim
from bikewatch.store.deliver import BatchOutcome
from bikewatch.store.journal import PHASE_CLAIMED, Item, Journal, write_journal
from bikewatch.store.ledger import Ledger
from bikewatch.store.workarea import WorkArea
from harness import files_under, read_csv
from journals import decided_by_hand

RED, GREEN, GREY = (200, 30, 30), (30, 200, 30), (120, 120, 120)


class ColourClassifier:
    """Mountain for reddish images, road for greenish ones, 50/50 for grey; by the mean of each image."""

    identity = "colour@test"
    path = Path("colour.fake")
    backend = "fake"
    contract = InputContract()

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.shape[1:] == (64, 64, 3), batch.shape
        self.batches.append(len(batch))
        red, green = batch[..., 0].mean(axis=(1, 2)), batch[..., 1].mean(axis=(1, 2))
        p_mountain = np.where(red > green + 10, 0.9, np.where(green > red + 10, 0.2, 0.5)).astype(np.float32)
        return np.stack([p_mountain, 1 - p_mountain], axis=1)


def png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def old(path: Path) -> None:
    """Still for an hour: a dump's file, complete (Mode.drain takes it without the settle wait)."""
    t = time.time() - 3600
    os.utime(path, (t, t), follow_symlinks=False)


@pytest.fixture
def logs() -> Iterator[list[dict[str, object]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


# --------------------------------------------------------------------------- the whole loop, in drain mode


def test_a_dump_through_every_stage_with_a_fake_classifier(tmp_path: Path, logs: list[dict[str, object]]) -> None:
    inbox, output = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    sources = {
        "red.png": png(inbox / "red.png", RED),
        "green.png": png(inbox / "green.png", GREEN),
        "grey.png": png(inbox / "grey.png", GREY),
        "DCIM/red.png": png(inbox / "DCIM" / "red.png", RED, (64, 64)),  # same name: numbered, never overwritten
    }
    (inbox / "notes.txt").write_text("not a photo")
    for p in files_under(inbox):
        old(p)
    digests = {rel: sha256_file(p) for rel, p in sources.items()}
    settings = Settings(inbox=inbox, output=output, decode_workers=1, unsure_below=0.7, max_batch=4,
                        read_ahead=0, watch_model=False)
    delivered: list[Item] = []
    service = Service(settings, Notifier(None), mode=Mode.drain(settings.settle_seconds), on_batch=delivered.extend)
    fake = ColourClassifier()
    service.inference = InferenceStage(None, max_batch=4, watch_model=False, log=service.log,
                                       load=lambda _path, _backend: fake)

    assert service.run() == 0

    rows = {os.path.relpath(r["source"], inbox): r for r in read_csv(output / "classifications.csv")}
    placed = {rel: os.path.relpath(r["destination"], output) for rel, r in rows.items()}
    assert {placed.pop("red.png"), placed.pop("DCIM/red.png")} == {"mountain/red.png", "mountain/red (1).png"}
    assert placed == {"green.png": "road/green.png", "grey.png": "unsure/grey.png", "notes.txt": "rejected/notes.txt"}
    assert rows["notes.txt"]["error"].startswith("not an image") and rows["notes.txt"]["confidence"] == ""
    assert rows["red.png"]["p_mountain"] == "0.900000" and rows["green.png"]["p_road"] == "0.800000"
    assert all(r["model"] == "colour@test" for r in rows.values())
    for rel, digest in digests.items():
        assert rows[rel]["sha256"] == digest and sha256_file(output / os.path.relpath(rows[rel]["destination"],
                                                                                      output)) == digest
    assert [p.relative_to(inbox) for p in files_under(inbox)] == []  # nothing left, no trace of the work area
    # One accounting path: the summary `sort` prints, the status counts and the log agree with the CSV.
    assert sorted(it.source for it in delivered) == sorted(rows)
    assert dict(service.counts.by_label) == {"mountain": 2, "road": 1, "unsure": 1, "rejected": 1}
    assert service.counts.reasons == {"not an image (unrecognised format)": 1}
    assert sorted(str(e["source"]) for e in logs if e["event"] in ("sorted", "rejected")) == sorted(rows)
    assert sum(fake.batches[2:]) == 4  # after the warm-up (1 and max_batch): each decodable photo once


# --------------------------------------------------------------------------- the stages one by one


def test_decide_batch_labels_names_and_reasons(tmp_path: Path) -> None:
    output = tmp_path / "sorted"
    png(output / "road" / "a.jpg", GREEN)  # on disk already: the next a.jpg is numbered
    items = [Item(key=f"b.{i}", source=src) for i, src in enumerate(["x/a.jpg", "y/a.jpg", "z/a.jpg", "bad.jpg"])]
    prepared = [Prepared(it.key, None, f"sha{i}", 10 + i, 5, decoded_from="full") for i, it in enumerate(items)]
    prepared[3] = Prepared("b.3", None, "sha3", 13, 5, "truncated image")
    probs = {0: np.array([0.2, 0.8]), 1: np.array([0.3, 0.7]), 2: np.array([0.55, 0.45])}
    got = decide_batch(items, prepared, probs, unsure_below=0.6, output=output, decided_at="T")
    assert [(it.label, it.dest, it.error) for it in got] == [
        ("road", "road/a (1).jpg", ""), ("road", "road/a (2).jpg", ""), ("unsure", "unsure/a.jpg", ""),
        ("rejected", "rejected/bad.jpg", "truncated image"),
    ]
    assert got[3].p_mountain is None and got[3].decoded_from == "" and got[0].decoded_from == "full"
    assert [it.sha256 for it in got] == ["sha0", "sha1", "sha2", "sha3"] and {it.timestamp for it in got} == {"T"}


def test_decode_stage_uses_a_read_ahead_only_from_the_current_model(tmp_path: Path) -> None:
    work = tmp_path / "work"
    a, b = png(work / "k.0", RED), png(work / "k.1", GREEN)
    journal = Journal(batch="k", phase=PHASE_CLAIMED, worker="t",
                      items=(Item(key="k.0", source="a.png"), Item(key="k.1", source="b.png")))
    read = Prepared("early", None, sha256_file(a), a.stat().st_size, 0, decoded_from="full")  # array dropped
    early = {"a.png": Usable(read, np.array([0.9, 0.1]), "model@1"),
             "b.png": Usable(Prepared("early", None, sha256_file(b), b.stat().st_size, 0), np.array([0.2, 0.8]),
                             "model@1")}
    with DecodePool(1) as pool:
        stage = DecodeStage(pool, max_pixels=100_000_000, previews=False)
        futures = stage.start(journal, work, {"a.png": early["a.png"]})  # b.png was not read ahead
        prepared, known = stage.gather(journal, futures, work, early, "model@1")
        assert list(known) == [0] and known[0].tolist() == [0.9, 0.1] and prepared[0].key == "k.0"
        assert prepared[1].array is not None and prepared[1].sha256 == sha256_file(b)
        # A model replaced since the read-ahead: its probabilities are not used; the file is read again.
        futures = stage.start(journal, work, early)
        prepared, known = stage.gather(journal, futures, work, early, "model@2")
        assert known == {} and all(p.array is not None for p in prepared)


def test_inference_stage_warms_up_and_keeps_the_model_when_a_reload_fails(tmp_path: Path,
                                                                           logs: list[dict[str, object]]) -> None:
    models = [ColourClassifier()]

    def load(_path: Path | None, _backend: str) -> ColourClassifier:
        if not models:
            raise OSError("gone")
        return models.pop()

    stage = InferenceStage(None, max_batch=8, watch_model=False, log=get_logger(), load=load)  # type: ignore[arg-type]
    first = stage.start("auto")
    assert first.batches == [1, 8]  # type: ignore[attr-defined]  # one photo and a full batch before READY
    probs = stage.predict([np.full((64, 64, 3), RED, dtype=np.float32), np.full((64, 64, 3), GREEN, np.float32)])
    assert probs.ravel().tolist() == pytest.approx([0.9, 0.1, 0.2, 0.8])
    assert stage.reload() is None and stage.model is first
    assert any(e["event"] == "model reload failed; keeping the current model" for e in logs)


def _claimed_batch(tmp_path: Path, n: int) -> tuple[Path, Path, WorkArea, Path, Journal]:
    inbox, output = tmp_path / "inbox", tmp_path / "sorted"
    for i in range(n):
        png(inbox / f"p{i}.png", RED)
    work = WorkArea(tmp_path / "state", "t")
    path = work.journal_path("t.1")
    journal = claim(inbox, work.dir, Journal(batch="t.1", phase=PHASE_CLAIMED, worker="t", model="colour@test",
                                             items=tuple(Item(key=f"t.1.{i:04d}", source=f"p{i}.png")
                                                         for i in range(n))), path)
    return inbox, output, work, path, journal


def test_deliverer_owes_rows_the_csv_cannot_take_and_a_retry_counts_them(tmp_path: Path,
                                                                          logs: list[dict[str, object]]) -> None:
    inbox, output, work, path, journal = _claimed_batch(tmp_path, 3)
    log_path = tmp_path / "log.csv"
    log_path.mkdir()  # a folder where the CSV should be: every append fails
    delivered: list[Item] = []
    accounting = Accounting(Metrics(), get_logger(), delivered.extend)
    released: list[str] = []
    deliverer = Deliverer(inbox=inbox, output=output, ledger=Ledger(log_path), accounting=accounting,
                          backoff=Backoff(1.0), log=get_logger(), release=released.extend)
    done: Future[tuple[Journal, list[Future[Prepared]]]] = Future()
    done.set_result((journal, []))
    batch = InFlight(journal, path, time.monotonic(), done)
    try:
        deliverer.start(batch, decided_by_hand(journal, work.dir, "mountain"), work.dir, 3, 1.0)
        assert deliverer.join(work.dir) is False
        assert deliverer.owed == [path] and deliverer.backoff.failing
        assert sorted(p.name for p in (output / "mountain").iterdir()) == ["p0.png", "p1.png", "p2.png"]
        assert delivered == [] and sorted(released) == ["p0.png", "p1.png", "p2.png"]

        log_path.rmdir()
        assert deliverer.retry(time.monotonic(), work.dir) is True
    finally:
        work.close()
    assert deliverer.owed == [] and not path.exists()
    assert [r["id"] for r in read_csv(log_path)] == ["t.1.0000", "t.1.0001", "t.1.0002"]
    assert [it.source for it in delivered] == ["p0.png", "p1.png", "p2.png"]
    assert accounting.counts.by_label == {"mountain": 3}
    assert [e.get("delivered_by") for e in logs if e["event"] == "sorted"] == ["retry"] * 3
    assert accounting.metrics.registry.get_sample_value("bikewatch_photos_total", {"label": "mountain"}) == 3


def test_recovered_files_take_the_same_accounting_path(tmp_path: Path, logs: list[dict[str, object]]) -> None:
    inbox, output = tmp_path / "inbox", tmp_path / "sorted"
    inbox.mkdir()
    state = tmp_path / "state"
    dead = state / "work" / "dead-1-abcdef"
    dead.mkdir(parents=True)
    (dead / "lock").write_bytes(b"")  # nobody holds it, nobody wrote it: a dead worker
    png(dead / "dead.1.0000", GREEN)
    claimed = Journal(batch="dead.1", phase=PHASE_CLAIMED, worker="dead", items=(Item(key="dead.1.0000",
                                                                                      source="g.png"),))
    write_journal(dead / "dead.1.json", decided_by_hand(claimed, dead, "road"))
    delivered: list[Item] = []
    accounting = Accounting(Metrics(), get_logger(), delivered.extend)
    work = WorkArea(state, "me")
    try:
        Recoverer(inbox=inbox, output=output, state_dir=state, ledger=Ledger(output / "log.csv"), stale_after=120,
                  accounting=accounting, backoff=Backoff(1.0), log=get_logger()).recover(work)
    finally:
        work.close()
    assert (output / "road" / "g.png").is_file() and not dead.exists()
    assert [it.source for it in delivered] == ["g.png"] and accounting.counts.by_label == {"road": 1}
    assert [e.get("delivered_by") for e in logs if e["event"] == "sorted"] == ["recovery"]
    assert len(read_csv(output / "log.csv")) == 1


def test_recovery_outlives_its_work_folder_vanishing(tmp_path: Path, logs: list[dict[str, object]]) -> None:
    """The inbox's filesystem goes away between creating our work folder and looking in it (a
    swap mid-renewal): recovery says so and looks again later, instead of crashing the service."""
    inbox, output, state = tmp_path / "inbox", tmp_path / "sorted", tmp_path / "inbox" / ".bikewatch"
    inbox.mkdir()
    recoverer = Recoverer(inbox=inbox, output=output, state_dir=state, ledger=Ledger(output / "log.csv"),
                          stale_after=120, accounting=Accounting(Metrics(), get_logger()), backoff=Backoff(1.0),
                          log=get_logger())
    work = WorkArea(state, "me")
    try:
        shutil.rmtree(state)  # the folder and everything around it are gone, as with a swapped filesystem
        recoverer.recover(work)
    finally:
        work.close()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "cannot look for stopped workers' folders now; will look again"]
    assert not recoverer.left  # nothing was found to be left: intake goes on, the next look finds what is there
    # Once a filesystem is back with a dead worker's folder on it, the next look recovers it.
    dead = state / "work" / "dead-1-abcdef"
    dead.mkdir(parents=True)
    (dead / "lock").write_bytes(b"")
    png(dead / "dead.1.0000", GREEN)
    claimed = Journal(batch="dead.1", phase=PHASE_CLAIMED, worker="dead", items=(Item(key="dead.1.0000",
                                                                                      source="g.png"),))
    write_journal(dead / "dead.1.json", decided_by_hand(claimed, dead, "road"))
    work = WorkArea(state, "me")
    try:
        recoverer.recover(work)
    finally:
        work.close()
    assert (output / "road" / "g.png").is_file() and not dead.exists()


def test_accounting_logs_each_damaged_journal_once(logs: list[dict[str, object]]) -> None:
    accounting = Accounting(Metrics(), get_logger(), log_path="/x/log.csv")
    accounting.damage(BatchOutcome(quarantined=[("j.json", "q/j.json", "empty")], fallback=[("b", "no such host")]))
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("damaged batch journal moved to quarantine; its photos are kept", "error"),
        ("the dead worker's CSV cannot be reached; its batch is recorded in ours", "warning"),
    ]
