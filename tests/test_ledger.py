"""The CSV ledger (bikewatch.store.ledger) on real files, read back with the csv module."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from bikewatch.store.ledger import COLUMNS, Ledger, Row, read_rows, render


def row(i: int, **kw: str) -> Row:
    values = dict(
        timestamp=f"2024-05-01T10:00:{i:02d}.000+00:00", source=f"/in/IMG_{i:04d}.jpg",
        destination=f"/out/road/IMG_{i:04d}.jpg", label="road", confidence="0.900000", p_mountain="0.100000",
        p_road="0.900000", sha256="ab" * 32, model="bikes@0123", error="", size_bytes="1234", id=f"w-1-a.0001.{i:04d}",
        worker="w",
    )
    values.update(kw)
    return Row(**values)


def load(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_columns_are_the_documented_ones() -> None:
    assert COLUMNS[:10] == ("timestamp", "source", "destination", "label", "confidence", "p_mountain", "p_road",
                            "sha256", "model", "error")
    assert tuple(f for f in Row.__dataclass_fields__) == COLUMNS


def test_header_written_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "sub" / "log.csv")
    ledger.append([row(1)])
    ledger.append([row(2), row(3)])
    Ledger(ledger.path).append([row(4)])  # a new process appending to an existing file
    text = ledger.path.read_bytes().decode("utf-8")
    assert text.count("timestamp,source,destination") == 1
    assert text.startswith(",".join(COLUMNS) + "\r\n")
    rows = load(ledger.path)
    assert [r["id"] for r in rows] == [row(i).id for i in (1, 2, 3, 4)]
    assert all(list(r) == list(COLUMNS) for r in rows)


def test_append_nothing_creates_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "log.csv")
    ledger.append([])
    assert not ledger.path.exists()


def test_awkward_values_round_trip(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "log.csv")
    awkward = [
        row(1, source='/in/comma, "quote".jpg'),
        row(2, source="/in/new\nline.jpg", error="cannot decode image: bad\r\nthing"),
        row(3, source="/in/ü 日本 🚲.jpg"),
        row(4, source="/in/" + os.fsdecode(b"bad-\xff-bytes.jpg")),
    ]
    ledger.append(awkward)
    rows = load(ledger.path)
    assert len(rows) == 4
    assert rows[0]["source"] == '/in/comma, "quote".jpg'
    assert rows[1]["source"] == "/in/new\nline.jpg"
    assert rows[1]["error"] == "cannot decode image: bad\r\nthing"
    assert rows[2]["source"] == "/in/ü 日本 🚲.jpg"
    assert rows[3]["source"] == "/in/bad-\\xff-bytes.jpg"  # visible, and the file stays valid UTF-8
    ledger.path.read_bytes().decode("utf-8")


def test_rows_are_whole_lines(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "log.csv")
    for i in range(5):
        ledger.append([row(i), row(i + 100)])
    assert ledger.path.read_bytes().endswith(b"\r\n")
    assert not ledger.repair_tail()
    assert len(load(ledger.path)) == 10


def test_render_is_pure_and_matches_append(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "log.csv")
    ledger.append([row(1), row(2)])
    assert ledger.path.read_bytes() == render([row(1), row(2)], header=True)
    assert render([], header=False) == b""


def test_repair_tail_trims_a_torn_line(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "log.csv")
    ledger.append([row(1), row(2)])
    good = ledger.path.read_bytes()
    torn = render([row(3)], header=False)[:37]
    with open(ledger.path, "ab") as fh:
        fh.write(torn)
    assert ledger.repair_tail() is True
    assert ledger.path.read_bytes() == good
    assert ledger.repair_tail() is False  # idempotent
    ledger.append([row(3)])
    assert [r["id"] for r in load(ledger.path)] == [row(i).id for i in (1, 2, 3)]


def test_repair_tail_of_a_torn_header_empties_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(b"timestamp,sour")
    ledger = Ledger(path)
    assert ledger.repair_tail() is True
    assert path.read_bytes() == b""
    ledger.append([row(1)])
    assert path.read_text(encoding="utf-8").count("timestamp,source") == 1


def test_repair_tail_on_missing_and_empty_files(tmp_path: Path) -> None:
    assert Ledger(tmp_path / "none.csv").repair_tail() is False
    (tmp_path / "empty.csv").write_bytes(b"")
    assert Ledger(tmp_path / "empty.csv").repair_tail() is False


def test_repair_tail_keeps_rows_when_the_torn_line_is_long(tmp_path: Path) -> None:
    # A torn line longer than the 64 KiB tail window must not wipe the good rows before it.
    ledger = Ledger(tmp_path / "log.csv")
    ledger.append([row(1), row(2)])
    good = ledger.path.read_bytes()
    with open(ledger.path, "ab") as fh:
        fh.write(render([row(3, error="x" * 100_000)], header=False)[:90_000])
    assert ledger.repair_tail() is True
    assert ledger.path.read_bytes() == good


def test_repair_tail_trims_a_tail_of_nul_bytes(tmp_path: Path) -> None:
    # After a power cut a file can end in zero-filled blocks where the last write never landed.
    ledger = Ledger(tmp_path / "log.csv")
    ledger.append([row(1)])
    good = ledger.path.read_bytes()
    with open(ledger.path, "ab") as fh:
        fh.write(b"\0" * 200_000)
    assert ledger.repair_tail() is True
    assert ledger.path.read_bytes() == good


def test_ids(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "log.csv")
    assert ledger.ids() == set()
    ledger.append([row(1), row(2, source="/in/a\nb.jpg")])
    assert ledger.ids() == {row(1).id, row(2).id}
    assert [r["id"] for r in read_rows(ledger.path)] == [row(1).id, row(2).id]


@pytest.mark.parametrize("n", [1, 40])
def test_append_is_one_write_per_batch(tmp_path: Path, n: int) -> None:
    # Two ledgers (two workers) appending alternately never interleave rows.
    a, b = Ledger(tmp_path / "log.csv"), Ledger(tmp_path / "log.csv")
    for k in range(5):
        a.append([row(i, worker="a", id=f"a{k}.{i}") for i in range(n)])
        b.append([row(i, worker="b", id=f"b{k}.{i}") for i in range(n)])
    rows = load(tmp_path / "log.csv")
    assert len(rows) == 10 * n
    workers = [r["worker"] for r in rows]
    assert workers == (["a"] * n + ["b"] * n) * 5
