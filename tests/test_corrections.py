"""``bikewatch corrections`` and ``train --log``: photos people moved to another label folder."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

import imagefactory
from bikewatch.cli import main
from bikewatch.offline.corrections import find_corrections, find_corrections_in_log, latest_per_destination, locate
from bikewatch.store.ledger import Ledger, Row, read_rows
from bikewatch.offline.training import list_class_files

NOW = "2024-05-02T12:00:00.000+00:00"


def make_run(output: Path, specs: list[tuple[str, str, float | None, tuple[int, int, int]]]) -> Path:
    """Real files in OUTPUT/<label>/<name> and their CSV rows: specs are (name, label, p_mountain, color)."""
    log = output / "classifications.csv"
    rows = []
    for i, (name, label, pm, color) in enumerate(specs):
        dest = output / label / name
        if label == "rejected":
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(b"not a picture")
        else:
            imagefactory.png(dest, color=color, size=(96 + i, 64))  # distinct bytes per photo
        data = dest.read_bytes()
        rows.append(Row(
            timestamp=NOW, source=f"/in/{name}", destination=str(dest), label=label,
            confidence="" if pm is None else f"{max(pm, 1 - pm):.6f}",
            p_mountain="" if pm is None else f"{pm:.6f}", p_road="" if pm is None else f"{1 - pm:.6f}",
            sha256=hashlib.sha256(data).hexdigest(), model="bikes@test",
            error="not an image (unrecognised format)" if label == "rejected" else "",
            size_bytes=str(len(data)), id=f"b.{i:04d}", worker="test",
        ))
    Ledger(log).append(rows)
    return log


SPECS = [
    ("a.png", "mountain", 0.91, (200, 40, 40)),
    ("b.png", "road", 0.20, (40, 200, 40)),
    ("c.png", "road", 0.35, (40, 40, 200)),
    ("d.png", "unsure", 0.52, (200, 200, 40)),
    ("same.png", "mountain", 0.88, (10, 10, 10)),
    ("same.png", "road", 0.30, (250, 250, 250)),
    ("junk.jpg", "rejected", None, (0, 0, 0)),
]


def move(output: Path, rel: str, to: str) -> None:
    src = output / rel
    os.rename(src, output / to / src.name)


def test_moved_photos_are_corrections_and_lookalikes_are_not(tmp_path: Path) -> None:
    out = tmp_path / "sorted"
    log = make_run(out, SPECS)
    move(out, "road/b.png", "mountain")  # the model said road, a person says mountain
    move(out, "unsure/d.png", "road")  # unsure, a person decided
    (out / "road" / "same.png").unlink()  # deleted; mountain/same.png is a *different* photo
    findings = find_corrections_in_log(log)
    got = sorted((c.display, c.logged, c.current, c.confidence) for c in findings.corrections)
    assert got == [("mountain/b.png", "road", "mountain", pytest.approx(0.8)),
                   ("road/d.png", "unsure", "road", pytest.approx(0.52))]
    assert [r["destination"] for r in findings.missing] == [str(out / "road" / "same.png")]
    assert findings.checked == 6  # rejected files are not sorted photos


def test_locate_finds_the_file_by_name_size_and_digest(tmp_path: Path) -> None:
    out = tmp_path / "sorted"
    log = make_run(out, SPECS[:2])
    rows = list(read_rows(log))
    here = locate(rows[0])
    assert (here.path, here.label, here.moved) == (out / "mountain" / "a.png", "mountain", False)
    move(out, "mountain/a.png", "road")
    moved = locate(rows[0])
    assert (moved.path, moved.label, moved.moved) == (out / "road" / "a.png", "road", True)
    (out / "road" / "a.png").write_bytes(b"x" * int(rows[0]["size_bytes"]))  # same name and size, other bytes
    assert locate(rows[0]).path is None


def test_only_the_latest_row_per_destination_counts() -> None:
    rows = [{"destination": "/o/road/x.jpg", "id": "1"}, {"destination": "/o/road/y.jpg", "id": "2"},
            {"destination": "/o/road/x.jpg", "id": "3"}]
    assert [r["id"] for r in latest_per_destination(rows)] == ["2", "3"]
    assert find_corrections([]).corrections == []


def test_cli_table_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sorted"
    log = make_run(out, SPECS)
    move(out, "road/c.png", "mountain")
    assert main(["corrections", "--log", str(log)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["file", "logged", "label", "current", "label", "confidence"]
    assert lines[1].split() == ["mountain/c.png", "road", "mountain", "0.650"]
    assert "1 of 6 sorted photos was moved" in text

    config = tmp_path / "bw.toml"
    config.write_text(f'inbox = "{tmp_path / "inbox"}"\noutput = "{out}"\n')
    assert main(["corrections", "--config", str(config), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows == [{"file": "mountain/c.png", "logged_label": "road", "current_label": "mountain",
                     "confidence": "0.650000", "path": str(out / "mountain" / "c.png")}]


def test_cli_without_corrections_or_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = make_run(tmp_path / "sorted", SPECS[:3])
    assert main(["corrections", "--log", str(log)]) == 0
    assert capsys.readouterr().out.strip() == "0 of 3 sorted photos were moved to another label folder"
    assert main(["corrections", "--log", str(tmp_path / "missing.csv")]) == 2


def test_output_folder_is_training_data_with_only_its_class_folders(tmp_path: Path) -> None:
    """`bikewatch train OUTPUT` works: unsure/, rejected/ and the CSV are not training data."""
    out = tmp_path / "sorted"
    make_run(out, SPECS)
    imagefactory.png(out / "rejected" / "looks-like-a-photo.png")
    move(out, "road/b.png", "mountain")
    found = {(p.relative_to(out).as_posix(), label) for p, label in list_class_files(out)}
    assert found == {("mountain/a.png", 0), ("mountain/b.png", 0), ("mountain/same.png", 0),
                     ("road/c.png", 1), ("road/same.png", 1)}


@pytest.mark.slow
def test_train_fine_tune_reports_accuracy_on_corrections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sorted"
    specs = [(f"m{i}.png", "mountain", 0.9, (150 + 10 * i, 60, 40)) for i in range(6)]
    specs += [(f"r{i}.png", "road", 0.1, (40, 60, 150 + 10 * i)) for i in range(6)]
    log = make_run(out, specs)
    move(out, "road/r0.png", "mountain")
    move(out, "mountain/m0.png", "road")
    model = tmp_path / "fixed.keras"
    original = tmp_path / "original"
    for label, color in (("mountain", (200, 60, 40)), ("road", (40, 60, 200))):
        for i in range(6):
            imagefactory.png(original / label / f"o{i}.png", color=color, size=(80 + i, 60))
    code = main(["train", str(out), "--out", str(model), "--fine-tune", "--log", str(log), "--epochs", "1",
                 "--batch-size", "4", "--no-augment", "--original", str(original)])
    assert code == 0
    said = capsys.readouterr().out
    assert "corrections: 2 photos" in said and "before fine-tuning" in said and "after fine-tuning: " in said
    card = json.loads(model.with_name("fixed.card.json").read_text())
    corr = card["corrections"]
    assert corr["photos"] == 2 and corr["log"] == str(log)
    assert 0.0 <= corr["accuracy_before"] <= 1.0 and 0.0 <= corr["accuracy_after"] <= 1.0
    ft = card["fine_tuning"]
    assert ft["original_data"] is True and ft["corrections_in_training"] == 2
    assert card["training"]["samples"] == 12 + 12 - 2  # output folder + original minus its held-out part


def test_train_log_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m.keras"), "--log", str(tmp_path / "no.csv")]) == 2
    assert "CSV log not found" in capsys.readouterr().err
