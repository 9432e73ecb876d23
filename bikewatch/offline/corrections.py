"""``bikewatch corrections``: photos people moved to another label folder after sorting.

The CSV log says where each photo was delivered (``OUTPUT/road/x.jpg``). When
someone disagrees they move the file (``OUTPUT/mountain/x.jpg``); that move
is a correction, and the corrected folders are training data again
(``bikewatch train OUTPUT --fine-tune --log OUTPUT/classifications.csv``).

A photo no longer at its logged place is looked for by name in the sibling
label folders; a candidate counts only when its size (and, when the log has
it, its sha256) matches the logged one, so a different photo that happens to
share the name is never mistaken for the moved one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from bikewatch.files import sha256_file
from bikewatch.labels import CLASSES, FOLDERS, SORTED
from bikewatch.store.ledger import read_rows

if TYPE_CHECKING:  # numpy, the model and training load only when a correction is evaluated
    from bikewatch.inference.model import Classifier
    from bikewatch.offline.training import Dataset



def resolve_log(log: Path | None, config: Path | None) -> Path:
    """The CSV log: ``--log`` wins, else the ``log`` setting of ``--config`` (or BIKEWATCH_* / defaults).

    Raises :class:`bikewatch.config.ConfigError` for a bad config file.
    """
    if log is not None:
        return Path(log)
    from bikewatch.config import load_settings

    return load_settings(config).log_path


@dataclass(frozen=True)
class Location:
    """Where a logged photo is now."""

    path: Path | None  # None: not found anywhere
    label: str  # the folder it is in ("" when not found)
    moved: bool  # found somewhere other than the logged destination


def _size(path: Path) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if os.path.isfile(path) else None


def _sha256(path: Path) -> str:
    """The file's sha256, or "" when it cannot be read (then it matches no row: not the moved photo)."""
    try:
        return sha256_file(path)
    except OSError:
        return ""


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def locate(row: Mapping[str, str]) -> Location:
    """Find the photo of one CSV row: at its destination, else by name in a sibling label folder.

    At the destination a matching size is taken as "still there" (cheap); in a
    sibling folder the size and the sha256 must both match.
    """
    dest = Path(row.get("destination", ""))
    want_size = _as_int(row.get("size_bytes", ""))
    if row.get("destination"):
        size = _size(dest)
        if size is not None and (want_size is None or size == want_size):
            return Location(dest, dest.parent.name, False)
    else:
        return Location(None, "", False)
    root = dest.parent.parent
    want_sha = row.get("sha256", "")
    for folder in FOLDERS:  # a moved photo is looked for in each folder bikewatch delivers into
        if folder == dest.parent.name:
            continue
        candidate = root / folder / dest.name
        size = _size(candidate)
        if size is None or (want_size is not None and size != want_size):
            continue
        if want_sha and _sha256(candidate) != want_sha:
            continue
        return Location(candidate, folder, True)
    return Location(None, "", False)


@dataclass(frozen=True)
class Correction:
    path: Path  # where the photo is now
    logged: str  # label in the CSV log
    current: str  # label folder it is in now
    confidence: float | None
    row: Mapping[str, str]

    @property
    def display(self) -> str:
        """``mountain/x.jpg``: the path under the output folder."""
        return f"{self.path.parent.name}/{self.path.name}"


@dataclass(frozen=True)
class Findings:
    corrections: list[Correction]
    missing: list[Mapping[str, str]]  # logged photos found nowhere (deleted or renamed)
    checked: int


def latest_per_destination(rows: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    """One row per destination path, the last one logged (delivery never overwrites, so an
    earlier row for the same path is a photo that had already left it); order kept; pure."""
    last: dict[str, Mapping[str, str]] = {}
    for row in rows:
        last.pop(row.get("destination", ""), None)
        last[row.get("destination", "")] = row
    return list(last.values())


def confidence_of(row: Mapping[str, str]) -> float | None:
    try:
        return float(row.get("confidence", ""))
    except (TypeError, ValueError):
        return None


def find_corrections(rows: Iterable[Mapping[str, str]]) -> Findings:
    """Sorted photos (mountain, road, unsure) that now sit in a different label folder."""
    corrections: list[Correction] = []
    missing: list[Mapping[str, str]] = []
    checked = 0
    for row in latest_per_destination(rows):
        if row.get("label") not in SORTED or not row.get("destination"):
            continue
        checked += 1
        where = locate(row)
        if where.path is None:
            missing.append(row)
        elif where.label != row["label"]:
            corrections.append(Correction(where.path, row["label"], where.label, confidence_of(row), row))
    return Findings(corrections, missing, checked)


def find_corrections_in_log(log: Path) -> Findings:
    return find_corrections(read_rows(log))


def format_table(findings: Findings) -> str:
    header = ("file", "logged label", "current label", "confidence")
    lines = [
        (c.display, c.logged, c.current, "" if c.confidence is None else f"{c.confidence:.3f}")
        for c in findings.corrections
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(v.ljust(w) for v, w in zip(header, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(out)


def summary(findings: Findings) -> str:
    n = len(findings.corrections)
    text = f"{n} of {findings.checked} sorted photos {'was' if n == 1 else 'were'} moved to another label folder"
    if findings.missing:
        text += f"; {len(findings.missing)} no longer found (deleted, renamed or moved elsewhere)"
    return text


def corrections_dataset(corrections: Iterable[Correction]) -> Dataset | None:
    """The corrected photos as an evaluation set: true class = the folder a person put them in.

    Photos moved to ``unsure/`` or ``rejected/`` carry no class and are left out;
    None when nothing usable remains.
    """
    import numpy as np

    from bikewatch.decode.preprocess import PreprocessError, preprocess_file
    from bikewatch.offline.training import Dataset

    paths, arrays, labels = [], [], []
    for c in corrections:
        if c.current not in CLASSES:
            continue
        try:
            arrays.append(preprocess_file(c.path))
        except PreprocessError:
            continue
        paths.append(c.path)
        labels.append(CLASSES.index(c.current))
    if not paths:
        return None
    return Dataset(tuple(paths), np.stack(arrays), np.array(labels, dtype=np.int64))


def evaluate_corrections(log: Path, *, before: Classifier | None = None, after: Classifier | None = None,
                         echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Accuracy on the photos people corrected, for ``before`` (the base model) and ``after``
    (the newly trained one), both :class:`bikewatch.inference.model.Classifier`; for ``train --log``."""
    from bikewatch.offline.training import evaluate

    findings = find_corrections_in_log(log)
    data = corrections_dataset(findings.corrections)
    result: dict[str, Any] = {"log": str(log), "photos": 0 if data is None else len(data)}
    if data is None:
        echo(f"corrections: no photos in {log} were moved to the other class folder; nothing to compare")
        return result
    echo(f"corrections: {len(data)} photos people moved to another class folder (true class = where they are now)")
    for key, model in (("before", before), ("after", after)):
        if model is None:
            continue
        m = evaluate(model, data)
        right = round(m.accuracy * m.count)
        result[f"accuracy_{key}"] = m.accuracy
        result[f"correct_{key}"] = right
        what = {"before": "before fine-tuning:", "after": "after fine-tuning: " if before is not None else "new model:"}
        echo(f"  {what[key]} accuracy {m.accuracy:.3f} ({right}/{m.count}) with {model.identity}")
    return result
