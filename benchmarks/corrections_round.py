"""A corrections round as a user would do it, on photos no model here has seen.

train/ is split into A (base model's training photos) and B (bikes kept away from it). User-like
photos of B's bikes (``augment.USER_SPEC``, or ``--spec framed``: bikes filling the frame;
written as JPEG files) are the dump: the base model
sorts them into OUTPUT/mountain|road with a real CSV log, every misfiled photo is moved to its
right folder, and ``bikewatch train OUTPUT --fine-tune BASE --log CSV --out NEW`` runs, with the
original photos (A) and, a second time, without them. Both models are then measured on the
corrected photos, on other user-like photos of bikes in neither A nor the dump, and on test/
with mirror images.

    .venv/bin/python benchmarks/corrections_round.py --spec framed [--seed 5] [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bikewatch.offline import training as T  # noqa: E402
from bikewatch.offline.augment import USER_SPEC, make_views  # noqa: E402
from bikewatch.store.ledger import Ledger, Row  # noqa: E402
from bikewatch.inference.model import CLASSES, load_classifier  # noqa: E402
from bikewatch.decode.preprocess import preprocess_file  # noqa: E402


def link_folder(paths, labels, root: Path) -> Path:
    for p, y in zip(paths, labels):
        (root / CLASSES[y]).mkdir(parents=True, exist_ok=True)
        os.symlink(Path(p).resolve(), root / CLASSES[y] / Path(p).name)
    return root


def write_views(views: np.ndarray, labels: np.ndarray, root: Path, prefix: str) -> list[tuple[Path, int]]:
    """Views as JPEG files at 4x size (users' photos are not 64x64), flat in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (per, y) in enumerate(zip(views, labels)):
        for j, v in enumerate(per):
            path = root / f"{prefix}{i:03d}_{j}.jpg"
            Image.fromarray(v.astype(np.uint8)).resize((256, 256), Image.Resampling.BICUBIC).save(path, quality=90)
            out.append((path, int(y)))
    return out


def accuracy(model_path: Path, items: list[tuple[Path, int]]) -> tuple[int, int]:
    clf = load_classifier(model_path)
    x = np.stack([preprocess_file(p) for p, _ in items])
    pred = clf.predict(x).argmax(1)
    return int((pred == np.array([y for _, y in items])).sum()), len(items)


def bikewatch(*args: str) -> str:
    cmd = [str(ROOT / ".venv/bin/bikewatch"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/bikes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bikewatch-corrections"))
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--spec", default="user", help="view family of the dump: user (augment.USER_SPEC) or framed")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    data = T.load_dataset(args.data / "train")
    folds = T.stratified_folds(data.y, 4, args.seed)
    b = np.random.default_rng(args.seed).permutation(folds[0])  # 50 bikes away from the base model, classes mixed
    a = np.setdiff1d(np.arange(len(data)), b)
    dump_b, other_b = b[: len(b) * 3 // 5], b[len(b) * 3 // 5:]
    link_folder([data.paths[i] for i in a], data.y[a], args.work / "A")
    base = args.work / "base.keras"
    bikewatch("train", str(args.work / "A"), "--out", str(base), "--val-split", "0.15", "--seed", str(args.seed))

    srcs = T.load_sources(data.paths)
    spec = USER_SPEC if args.spec == "user" else args.spec
    dump = write_views(make_views([srcs[i] for i in dump_b], 4, 50 + args.seed, spec), data.y[dump_b],
                       args.work / "dump", "d")
    other = write_views(make_views([srcs[i] for i in other_b], 4, 60 + args.seed, spec), data.y[other_b],
                        args.work / "other", "o")
    test = []
    for p, y in T.list_class_files(args.data / "test"):
        m = args.work / "test-mirrors" / f"{p.stem}_mirror.png"
        m.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.mirror(Image.open(p).convert("RGB")).save(m)
        test += [(p, y), (m, y)]

    # sort the dump as the service would, with a real CSV log, then correct the misfiled ones
    output = args.work / "OUTPUT"
    clf = load_classifier(base)
    probs = clf.predict(np.stack([preprocess_file(p) for p, _ in dump]))
    rows, corrected = [], []
    for k, ((p, y), pr) in enumerate(zip(dump, probs)):
        label = CLASSES[int(pr.argmax())]
        dest = output / label / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        blob = dest.read_bytes()
        rows.append(Row(timestamp="2026-12-01T09:00:00.000+00:00", source=str(p), destination=str(dest), label=label,
                        confidence=f"{pr.max():.6f}", p_mountain=f"{pr[0]:.6f}", p_road=f"{pr[1]:.6f}",
                        sha256=hashlib.sha256(blob).hexdigest(), model=clf.identity, error="",
                        size_bytes=str(len(blob)), id=f"sim.{k:04d}", worker="sim"))
        if label != CLASSES[y]:
            (output / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            os.rename(dest, output / CLASSES[y] / p.name)
            corrected.append((output / CLASSES[y] / p.name, y))
    log = output / "classifications.csv"
    Ledger(log).append(rows)
    report: dict = {"dump": len(dump), "misfiled": len(corrected), "other_unseen": len(other), "test_mirrors": len(test)}
    report["base"] = {"corrections": accuracy(base, corrected), "other": accuracy(base, other),
                      "test_mirrors": accuracy(base, test)}
    print("base", report["base"], flush=True)

    nocard = args.work / "alone" / "base.keras"  # a copy without its card: original photos not at hand
    nocard.parent.mkdir()
    shutil.copyfile(base, nocard)
    for name, model, extra in (("with original", base, ["--original", str(args.work / "A")]),
                               ("output folder alone", nocard, [])):
        new = args.work / f"new-{'orig' if extra else 'alone'}.keras"
        said = bikewatch("train", str(output), "--fine-tune", str(model), "--log", str(log), "--out", str(new), *extra)
        report[name] = {"corrections": accuracy(new, corrected), "other": accuracy(new, other),
                        "test_mirrors": accuracy(new, test), "said": said.splitlines()[-6:]}
        print(name, {k: v for k, v in report[name].items() if k != "said"}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
