"""``bikewatch classify`` as a real child process, plus its pure formatting helpers.

Each child process imports TensorFlow (seconds), so the CLI runs are few and
module-scoped; the tests then inspect what those runs printed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imagefactory as f
from bikewatch.offline.classify import CSV_COLUMNS, Result, expand_paths, to_csv, to_json, to_table
from bikewatch.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]

GOOD = ("red.jpg", "blue.png", "clear.png", "anim.gif", "UPPER.JPG")
BROKEN = ("empty.jpg", "truncated.jpg", "page.jpg", "bomb.png")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "bikewatch", "classify", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def make_inbox(folder: Path) -> Path:
    f.jpeg(folder / "red.jpg", color=f.RED)
    f.png(folder / "blue.png", color=f.BLUE)
    f.png(folder / "clear.png", "RGBA", alpha=0)
    f.animated_gif(folder / "anim.gif")
    f.jpeg(folder / "UPPER.JPG", color=f.GREEN)
    f.empty(folder / "empty.jpg")
    f.truncated_jpeg(folder / "truncated.jpg")
    f.html_as_jpg(folder / "page.jpg")
    f.bomb_png(folder / "bomb.png")
    # Not image files of this folder: must not show up.
    (folder / "notes.txt").write_text("hello")
    f.jpeg(folder / ".hidden.jpg")
    f.jpeg(folder / "nested" / "deep.jpg")
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CSV run over a folder holding good and broken files."""
    folder = make_inbox(tmp_path_factory.mktemp("mixed") / "inbox")
    proc = run_cli(str(folder), "--format", "csv")
    return {"folder": folder, "proc": proc, "rows": list(csv.DictReader(io.StringIO(proc.stdout)))}


@pytest.fixture(scope="module")
def clean_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One JSON run over good files only: a folder plus one explicit file."""
    root = tmp_path_factory.mktemp("clean")
    f.jpeg(root / "folder" / "a.jpg", color=f.RED)
    f.webp(root / "folder" / "b.webp", color=f.BLUE)
    single = f.jpeg(root / "single.jpeg", color=f.GREEN, exif_orientation=6)
    proc = run_cli(str(root / "folder"), str(single), "--format", "json")
    return {"root": root, "single": single, "proc": proc}


# --------------------------------------------------------------------------- CSV run with failures


def test_csv_header_and_one_row_per_image_file(mixed: dict) -> None:
    proc = mixed["proc"]
    header = proc.stdout.splitlines()[0]
    assert header.startswith("path,label,confidence,p_mountain,p_road"), header
    assert header == ",".join(CSV_COLUMNS)
    folder: Path = mixed["folder"]
    expected = sorted(str(folder / name) for name in GOOD + BROKEN)
    assert sorted(r["path"] for r in mixed["rows"]) == expected
    assert [r["path"] for r in mixed["rows"]] == sorted(r["path"] for r in mixed["rows"])  # folder order is sorted


def test_csv_good_rows_have_label_and_probabilities(mixed: dict) -> None:
    good = [r for r in mixed["rows"] if Path(r["path"]).name in GOOD]
    assert len(good) == len(GOOD)
    models = {r["model"] for r in mixed["rows"]}
    assert len(models) == 1 and models.pop().startswith("bikes@")
    for r in good:
        assert r["error"] == ""
        assert r["label"] in ("mountain", "road")
        pm, pr, conf = float(r["p_mountain"]), float(r["p_road"]), float(r["confidence"])
        assert pm + pr == pytest.approx(1.0, abs=2e-6)
        assert conf == pytest.approx(max(pm, pr), abs=1e-6)
        assert r["label"] == ("mountain" if pm >= pr else "road")
        assert len(r["p_mountain"].split(".")[1]) == 6


def test_csv_broken_rows_have_an_error_and_no_label(mixed: dict) -> None:
    broken = {Path(r["path"]).name: r for r in mixed["rows"] if Path(r["path"]).name in BROKEN}
    assert sorted(broken) == sorted(BROKEN)
    for r in broken.values():
        assert r["label"] == "" and r["confidence"] == "" and r["p_mountain"] == "" and r["p_road"] == ""
        assert r["error"] != ""
    assert "empty" in broken["empty.jpg"]["error"]
    assert "truncated" in broken["truncated.jpg"]["error"]
    assert "not an image" in broken["page.jpg"]["error"]
    assert "too large" in broken["bomb.png"]["error"]


def test_exit_status_is_1_when_any_file_failed(mixed: dict) -> None:
    proc = mixed["proc"]
    assert proc.returncode == 1, proc.stderr
    assert f"{len(BROKEN)} of {len(GOOD) + len(BROKEN)} files could not be classified" in proc.stderr


def test_cli_probabilities_match_the_in_process_classifier(mixed: dict, default_classifier) -> None:
    from bikewatch.decode.preprocess import preprocess_file

    good = [r for r in mixed["rows"] if Path(r["path"]).name in GOOD]
    probs = default_classifier.predict(np.stack([preprocess_file(r["path"]) for r in good]))
    got = np.array([[float(r["p_mountain"]), float(r["p_road"])] for r in good])
    assert np.allclose(got, probs, atol=1e-5)
    assert {r["model"] for r in good} == {default_classifier.identity}


# --------------------------------------------------------------------------- JSON run without failures


def test_json_output_parses_and_exit_status_is_0(clean_json: dict) -> None:
    proc = clean_json["proc"]
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    root: Path = clean_json["root"]
    assert [r["path"] for r in rows] == [str(root / "folder" / "a.jpg"), str(root / "folder" / "b.webp"),
                                         str(clean_json["single"])]
    for r in rows:
        assert set(r) == {"path", "label", "confidence", "p_mountain", "p_road", "error", "model"}
        assert r["error"] is None and r["label"] in ("mountain", "road")
        assert r["p_mountain"] + r["p_road"] == pytest.approx(1.0, abs=1e-5)
        assert r["confidence"] == max(r["p_mountain"], r["p_road"])
    assert "could not be classified" not in proc.stderr


# --------------------------------------------------------------------------- usage errors (no TensorFlow needed)


def test_no_image_files_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert main(["classify", str(tmp_path)]) == 2
    assert "no image files" in capsys.readouterr().err


def test_missing_model_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = f.jpeg(tmp_path / "a.jpg")
    assert main(["classify", str(photo), "--model", str(tmp_path / "none.keras")]) == 2
    err = capsys.readouterr().err
    assert "model file not found" in err and "none.keras" in err


# --------------------------------------------------------------------------- pure helpers


def test_expand_paths_keeps_files_and_lists_folders(tmp_path: Path) -> None:
    f.jpeg(tmp_path / "d" / "b.jpg")
    f.jpeg(tmp_path / "d" / "a.PNG")
    (tmp_path / "d" / "c.txt").write_text("x")
    f.jpeg(tmp_path / "d" / ".h.jpg")
    f.jpeg(tmp_path / "d" / "sub" / "e.jpg")
    explicit = tmp_path / "notes.txt"  # named explicitly: kept, and will fail as "not an image"
    assert expand_paths([str(tmp_path / "d"), str(explicit)]) == [
        tmp_path / "d" / "a.PNG", tmp_path / "d" / "b.jpg", explicit]


def test_formatters_agree_on_numbers_and_errors() -> None:
    results = [Result("a.jpg", "road", 0.25, 0.75), Result("b.jpg", "", None, None, "empty file")]
    rows = list(csv.reader(io.StringIO(to_csv(results, "m@1"))))
    assert rows == [list(CSV_COLUMNS), ["a.jpg", "road", "0.750000", "0.250000", "0.750000", "", "m@1"],
                    ["b.jpg", "", "", "", "", "empty file", "m@1"]]
    data = json.loads(to_json(results, "m@1"))
    assert data[0]["confidence"] == 0.75 and data[1]["label"] is None and data[1]["error"] == "empty file"
    table = to_table(results)
    assert "ERROR" in table and "empty file" in table and "0.750" in table
