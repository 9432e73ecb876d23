"""``bikewatch classify``: classify files without moving anything.

Pure formatting functions over :class:`Result` rows, so the daemon's CSV and
this command's CSV agree on column names and number formats.
"""

from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bikewatch.inference.model import Classifier
from bikewatch.labels import CLASSES
from bikewatch.decode.preprocess import PreprocessError, is_image_name, preprocess_file
from bikewatch.store.ledger import probability_field

CSV_COLUMNS = ("path", "label", "confidence", "p_mountain", "p_road", "error", "model")


@dataclass(frozen=True)
class Result:
    path: str
    label: str  # "" when error
    p_mountain: float | None
    p_road: float | None
    error: str = ""

    @property
    def confidence(self) -> float | None:
        if self.p_mountain is None or self.p_road is None:
            return None
        return max(self.p_mountain, self.p_road)


def expand_paths(args: Sequence[str]) -> list[Path]:
    """Files as given; a folder argument means the image files directly inside it, sorted."""
    out: list[Path] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            out += sorted(c for c in p.iterdir() if c.is_file() and is_image_name(c.name) and not c.name.startswith("."))
        else:
            out.append(p)
    return out


def classify_paths(classifier: Classifier, paths: Sequence[Path], batch_size: int = 64) -> list[Result]:
    """Preprocess in threads, predict in batches; a broken file becomes a Result with ``error``."""

    def prep(p: Path) -> np.ndarray | str:
        try:
            return preprocess_file(p)
        except PreprocessError as exc:
            return exc.reason

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        prepared = list(pool.map(prep, paths))
    good = [i for i, a in enumerate(prepared) if isinstance(a, np.ndarray)]
    probs = np.zeros((len(paths), 2), dtype=np.float32)
    for start in range(0, len(good), batch_size):
        idx = good[start : start + batch_size]
        probs[idx] = classifier.predict(np.stack([prepared[i] for i in idx]))
    results = []
    for i, path in enumerate(paths):
        item = prepared[i]
        if isinstance(item, str):
            results.append(Result(str(path), "", None, None, item))
        else:
            pm, pr = float(probs[i, 0]), float(probs[i, 1])
            results.append(Result(str(path), CLASSES[int(pr > pm)], pm, pr))
    return results


def to_csv(results: Iterable[Result], model: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in results:
        w.writerow([r.path, r.label, probability_field(r.confidence), probability_field(r.p_mountain),
                    probability_field(r.p_road), r.error, model])
    return buf.getvalue()


def to_json(results: Iterable[Result], model: str) -> str:
    rows = [
        {"path": r.path, "label": r.label or None, "confidence": r.confidence, "p_mountain": r.p_mountain,
         "p_road": r.p_road, "error": r.error or None, "model": model}
        for r in results
    ]
    return json.dumps(rows, indent=2)


def to_table(results: Sequence[Result]) -> str:
    width = max([len(r.path) for r in results] + [4])
    lines = [f"{'path':<{width}}  {'label':<8}  {'conf':>6}  p_mountain  p_road"]
    for r in results:
        if r.error:
            lines.append(f"{r.path:<{width}}  {'ERROR':<8}  {r.error}")
        else:
            lines.append(
                f"{r.path:<{width}}  {r.label:<8}  {r.confidence:6.3f}  {r.p_mountain:10.4f}  {r.p_road:6.4f}"
            )
    return "\n".join(lines)
