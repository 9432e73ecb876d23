"""Many small, distinct photos, fast; and content-hash bookkeeping for "nothing lost" checks.

Every photo is random noise (seeded, so a run is reproducible) with its index
drawn into it, so no two files share bytes. A 32x32 JPEG takes well under a
millisecond to write, so thousands are cheap.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw


def photo_bytes(index: int, size: tuple[int, int] = (32, 32), quality: int = 85, seed: int = 0) -> bytes:
    """JPEG bytes of noise with ``index`` drawn in; distinct for every (index, seed)."""
    rng = np.random.default_rng((seed, index))
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    ImageDraw.Draw(im).text((1, 1), str(index), fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_photos(folder: Path, count: int, *, start: int = 0, size: tuple[int, int] = (32, 32),
                 prefix: str = "IMG_", seed: int = 0) -> list[Path]:
    """``count`` distinct JPEGs named ``<prefix><index>.jpg`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        p = folder / f"{prefix}{i:05d}.jpg"
        p.write_bytes(photo_bytes(i, size, seed=seed))
        out.append(p)
    return out


def broken_bytes(index: int) -> bytes:
    """Distinct files that are not decodable images: truncated JPEGs, text, noise (never empty)."""
    kind = index % 3
    if kind == 0:
        data = photo_bytes(100_000 + index, (64, 64))
        return data[: len(data) // 2]
    if kind == 1:
        return f"<html><body>404 not found #{index}</body></html>\n".encode()
    return np.random.default_rng((7, index)).integers(0, 256, 2048, dtype=np.uint8).tobytes()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_multiset(paths: Iterable[Path]) -> collections.Counter[str]:
    return collections.Counter(sha256_file(p) for p in paths)


def move_in(staging: Path, inbox: Path) -> int:
    """Rename every file of ``staging`` into ``inbox`` (same filesystem): they appear 'at once'."""
    n = 0
    for entry in os.scandir(staging):
        target = os.path.join(inbox, entry.name)
        if os.path.lexists(target):  # rename() would replace it: a test must never lose a file itself
            raise FileExistsError(target)
        os.rename(entry.path, target)
        n += 1
    return n


# --------------------------------------------------------------------------- checking the guarantee


def _walk(folder: Path, skip_state: bool = True) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        if skip_state:
            dirs[:] = [d for d in dirs if d != ".bikewatch"]
        for f in files:
            if f == "classifications.csv":
                continue
            out.append(Path(root) / f)
    return sorted(out)


def check_nothing_lost(inputs: collections.Counter[str], inbox: Path, output: Path,
                       rows: list[dict[str, str]]) -> dict[str, int]:
    """The invariant of "nothing lost, ever", by content hashes.

    Every input's bytes are in exactly one place (a label folder of the output, or
    still waiting in the inbox); every delivered file has exactly one CSV row whose
    destination exists and whose sha256 matches; no ``*.partial`` is left anywhere.
    Returns how many files each place holds.
    """
    delivered = _walk(output)
    waiting = _walk(inbox)
    partials = [str(p) for p in delivered + waiting if p.name.endswith(".partial")]
    assert not partials, f"left-over partial copies: {partials}"
    found = hash_multiset(delivered + waiting)
    missing = inputs - found
    extra = found - inputs
    assert not missing and not extra, (
        f"{sum(missing.values())} input(s) lost, {sum(extra.values())} file(s) doubled or unknown; "
        f"lost={list(missing)[:5]} extra={list(extra)[:5]}"
    )
    by_dest = collections.Counter(os.path.realpath(r["destination"]) for r in rows)
    doubled = [d for d, n in by_dest.items() if n > 1]
    assert not doubled, f"{len(doubled)} file(s) with more than one CSV row: {doubled[:5]}"
    ids = collections.Counter(r["id"] for r in rows)
    assert all(n == 1 for n in ids.values()), f"CSV ids repeated: {[i for i, n in ids.items() if n > 1][:5]}"
    on_disk = {os.path.realpath(p) for p in delivered}
    no_row = sorted(on_disk - set(by_dest))
    assert not no_row, f"{len(no_row)} delivered file(s) without a CSV row: {no_row[:5]}"
    no_file = sorted(set(by_dest) - on_disk)
    assert not no_file, f"{len(no_file)} CSV row(s) whose destination does not exist: {no_file[:5]}"
    for r in rows:
        got = sha256_file(Path(r["destination"]))
        assert got == r["sha256"], f"CSV sha256 of {r['destination']} is {r['sha256']}, file has {got}"
    places = collections.Counter(p.relative_to(output).parts[0] for p in delivered)
    places["inbox"] = len(waiting)
    return dict(places)


def work_leftovers(inbox: Path) -> list[str]:
    """Anything in INBOX/.bikewatch/work except lock files (and the folders holding them)."""
    work = inbox / ".bikewatch" / "work"
    return [str(p) for p in _walk(work, skip_state=False) if p.name != "lock"] if work.exists() else []


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
