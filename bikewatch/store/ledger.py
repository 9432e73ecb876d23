"""The CSV ledger: one row per delivered file, appended whole, fsynced per batch.

A batch's rows go out in a single ``write()`` on an ``O_APPEND`` descriptor
under an exclusive ``flock`` (several workers on one machine may share the
file), then ``fsync``. A power cut can leave a torn last line; start-up
recovery trims it (:func:`repair_tail`) and rewrites the rows that were lost,
which it finds by the ``id`` column.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

COLUMNS = (
    "timestamp", "source", "destination", "label", "confidence", "p_mountain", "p_road",
    "sha256", "model", "error", "size_bytes", "id", "worker", "decoded_from",
)
"""A file started with fewer columns (before ``decoded_from``) keeps them: see :meth:`Ledger.append`."""


@dataclass(frozen=True)
class Row:
    timestamp: str  # ISO 8601, UTC
    source: str
    destination: str
    label: str  # mountain, road, unsure or rejected
    confidence: str
    p_mountain: str
    p_road: str
    sha256: str
    model: str
    error: str
    size_bytes: str
    id: str  # unique per claimed file: lets recovery tell whether the row was written
    worker: str
    decoded_from: str = ""  # "preview" (the embedded EXIF preview), "full", or "" when not decoded

    def values(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


def probability_field(p: float | None) -> str:
    """A probability or confidence as every bikewatch CSV writes it: six decimals (enough to rank,
    short enough to read in a spreadsheet); empty when there is none (a rejected file)."""
    return "" if p is None else f"{p:.6f}"


def _text(value: str) -> str:
    # File names may hold bytes that are not UTF-8 (surrogate escapes): keep them visible
    # as the bytes they are ("\\xff"), not as Python's internal surrogate ("\\udcff").
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = value.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def render(rows: Iterable[Row], *, header: bool, columns: Sequence[str] = COLUMNS) -> bytes:
    """CSV bytes for ``rows`` (and the header first when asked) in ``columns``; pure."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180; spreadsheets and pandas read it
    if header:
        writer.writerow(columns)
    for row in rows:
        values = row.values() if columns == COLUMNS else [getattr(row, c, "") for c in columns]
        writer.writerow([_text(v) for v in values])
    return buf.getvalue().encode("utf-8")


def header_columns(first: bytes) -> tuple[str, ...]:
    """The columns named by a CSV file's first line (``first`` holds at least that line); pure."""
    line = first.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    return tuple(next(csv.reader([line]), []))


class Ledger:
    """Appends rows to the CSV file; creates it with its header on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._columns: tuple[tuple[int, int], tuple[str, ...]] | None = None  # (dev, inode) -> its header

    def _columns_of(self, fd: int, st: os.stat_result) -> tuple[str, ...]:
        """The columns of the file already there, so that rows always match its header.

        A CSV begun by an older version has no ``decoded_from`` column: its new rows leave that
        out rather than carry one value more than the header names, which pandas and
        spreadsheets would refuse or misalign. Start a new file to get the new column.
        """
        key = (st.st_dev, st.st_ino)
        if st.st_size == 0:
            self._columns = (key, COLUMNS)  # the header about to be written
        elif self._columns is None or self._columns[0] != key:
            try:
                cols = header_columns(os.pread(fd, 1 << 16, 0))
            except OSError:  # opened write-only (see append): assume the current columns
                cols = COLUMNS
            self._columns = (key, cols if "id" in cols else COLUMNS)
        return self._columns[1]

    def append(self, rows: list[Row]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)  # read: its header
        except PermissionError:  # a log we may append to but not read
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            size = st.st_size
            data = render(rows, header=size == 0, columns=self._columns_of(fd, st))
            written = os.write(fd, data)
            if written != len(data):  # a short write on a full disk: undo our partial line
                os.ftruncate(fd, size)
                raise OSError(28, "short write to the CSV log (disk full?)", str(self.path))
            os.fsync(fd)
        finally:
            os.close(fd)

    def repair_tail(self) -> bool:
        """Trim a torn last line left by a power cut; True when something was trimmed."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size == 0:
                return False
            tail_len = min(size, 1 << 16)
            os.lseek(fd, size - tail_len, os.SEEK_SET)
            tail = os.read(fd, tail_len)
            if tail.endswith(b"\n"):
                return False
            # The last complete line may lie before this window (a long torn batch, or a tail of
            # NULs after a power cut): look further back rather than cutting the whole file.
            end, new_size = size, 0
            while end > 0:
                start = max(0, end - (1 << 16))
                os.lseek(fd, start, os.SEEK_SET)
                cut = os.read(fd, end - start).rfind(b"\n")
                if cut >= 0:
                    new_size = start + cut + 1
                    break
                end = start
            os.ftruncate(fd, new_size)
            os.fsync(fd)
            return True
        finally:
            os.close(fd)

    def ids(self) -> set[str]:
        """Every ``id`` in the file: which rows already exist."""
        return {row.get("id", "") for row in read_rows(self.path)}

    def present(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` have a row already; untroubled by damage anywhere else in the file.

        Looks for each id as the whole field it is written as (``,<id>,``: the ``id`` column is
        neither the first nor the last), in the raw bytes: a torn line, NULs after a power cut or
        an unbalanced quote elsewhere cannot hide a row, or raise, as they would in a CSV parser.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return set()
        return {i for i in ids if b"," + csv_field(i) + b"," in data}

    def row(self, row_id: str) -> dict[str, str] | None:
        """The row with ``row_id``, read from its own line only (see :meth:`present`); None if none."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        at = data.find(b"," + csv_field(row_id) + b",")
        if at < 0:
            return None
        start, end = data.rfind(b"\n", 0, at) + 1, data.find(b"\n", at)
        line = data[start:] if end < 0 else data[start:end + 1]
        try:
            values = next(csv.reader(io.StringIO(line.decode("utf-8", "replace"))), [])
        except csv.Error:
            return None
        if len(values) != len(COLUMNS):
            return None
        found = dict(zip(COLUMNS, values))
        return found if found["id"] == row_id else None


def csv_field(value: str) -> bytes:
    """``value`` as one field of a row written by :func:`render` (quoted when it must be); pure."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow([_text(value)])
    return buf.getvalue().encode("utf-8")


def read_rows(path: Path) -> Iterator[dict[str, str]]:
    """Rows as dicts; a missing file has none."""
    try:
        fh = open(path, newline="", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with fh:
        yield from csv.DictReader(fh)
