"""Pool separate ``benchmarks/recipes.py`` runs (one seed each) into one k-fold summary.

The 10-fold runs went one seed per process, so each could be stopped at the deadline and
still leave whole seeds behind. This reads their ``--json`` reports and the per-fold lines
of their logs, and reports each recipe's mean ± sd both over seeds (each seed's k-fold mean,
as the 5-fold table did) and over all folds of all seeds (the fold-to-fold spread). The
temperature and ECE were fitted per seed on that seed's pooled out-of-fold user-like views;
they are given per seed and as a mean.

    .venv/bin/python benchmarks/kfold_summary.py --json benchmarks/results-kfold10.json \\
        --reports benchmarks/results-kfold10-*-s?.json --logs benchmarks/results-kfold10-*.log \\
        [--card bikewatch/default_model/bikes.card.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

FOLD_LINE = re.compile(r"^(?P<recipe>\S+) seed (?P<seed>\d+) fold (?P<fold>\d+): (?P<m>\{.*\}) \(\d+s\)$")
METRICS = ("clean", "user", "mirror_flips")


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "n": len(values)}


def summarise(reports: list[dict], fold_lines: list[str]) -> dict:
    """Per recipe: seeds run, mean ± sd over seeds and over all folds, calibration per seed."""
    folds: dict[str, dict[int, list[dict]]] = {}
    for line in fold_lines:
        m = FOLD_LINE.match(line.strip())
        if m:
            folds.setdefault(m["recipe"], {}).setdefault(int(m["seed"]), []).append(json.loads(m["m"]))
    k = {r["folds"] for r in reports}
    if len(k) != 1:
        raise SystemExit(f"the reports mix fold counts {sorted(k)}")
    out: dict = {"folds": k.pop(), "user_views": reports[0]["user_views"], "recipes": {}}
    for name in sorted({n for r in reports for n in r["recipes"]}):
        runs = [(r["seeds"][0], r["recipes"][name]) for r in reports if name in r["recipes"]]
        seeds = [s for s, _ in runs]
        every = [f for s in seeds for f in folds.get(name, {}).get(s, [])]
        if len(every) != out["folds"] * len(seeds):
            raise SystemExit(f"{name}: {len(every)} fold lines in the logs for {len(seeds)} seeds x {out['folds']} folds")
        entry: dict = {"seeds": seeds}
        for key in METRICS:
            per_seed = [run[key]["per_seed"][0] for _, run in runs]
            entry[key] = {"over_seeds": spread(per_seed), "over_folds": spread([f[key] for f in every]),
                          "per_seed": per_seed}
        for key in ("temperature", "ece_user_before", "ece_user_after"):
            entry[key] = {"per_seed": [run[key] for _, run in runs], "mean": float(np.mean([run[key] for _, run in runs]))}
        for thr in ("0.6", "0.7", "0.8"):
            cell = [run[f"unsure_below_{thr}"] for _, run in runs]
            rest = [c["accuracy_of_the_rest"] for c in cell]  # None where every photo was unsure
            entry[f"unsure_below_{thr}"] = {"share_unsure": float(np.mean([c["share_unsure"] for c in cell])),
                                            "accuracy_of_the_rest": None if None in rest else float(np.mean(rest))}
        entry["seconds"] = float(sum(run["seconds"] for _, run in runs))
        out["recipes"][name] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reports", type=Path, nargs="+", required=True)
    ap.add_argument("--logs", type=Path, nargs="+", required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--card", type=Path, help="also write the summary into this model card under 'kfold_10'")
    args = ap.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    lines = [line for p in args.logs for line in p.read_text().splitlines()]
    summary = summarise(reports, lines)
    summary["how"] = " ".join(__doc__.split("\n\n")[1].split())
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    for name, e in summary["recipes"].items():
        print(name, "seeds", e["seeds"], " ".join(
            f"{k} {e[k]['over_seeds']['mean']:.3f}±{e[k]['over_seeds']['sd']:.3f} (folds ±{e[k]['over_folds']['sd']:.3f})"
            for k in METRICS), f"T {e['temperature']['mean']:.2f} ECE {e['ece_user_before']['mean']:.3f}->"
            f"{e['ece_user_after']['mean']:.3f}")
    if args.card:
        card = json.loads(args.card.read_text())
        card["kfold_10"] = summary
        args.card.write_text(json.dumps(card, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
