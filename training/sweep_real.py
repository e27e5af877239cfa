"""False findings per scan, inserted-nodule sensitivity and tumours found, across thresholds, from
the ``.npz`` files of :mod:`training.real_inserted` (or :mod:`training.real_negatives`) written with
the weights under study.

Used to pick an operating threshold by cross-validation: weights trained with one patient's
scans left out (``training.finetune_real --exclude``) are run over that patient's scans (with a
new insertion seed), and the threshold is read off here, never off a held-out reporting scan.

    .venv/bin/python -m training.sweep_real /tmp/cv-a0001 /tmp/cv-a0002
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)


def scan_stats(path: Path, thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, Any]:
    """Per threshold: false findings, inserted nodules >= 5 mm found / present, tumour found."""
    z = np.load(path)
    final = z["final"].astype(bool)
    score = z["merged"]
    label = z["label"]
    centres = z["centre_mm"]
    inserted = json.loads(str(z["inserted"])) if "inserted" in z else []
    if "tumour" in z:
        tumour = z["tumour"].astype(bool)
    else:  # older files: a positive that is not an inserted nodule is on the tumour
        tumour = label == 1
        for n in inserted:
            d = np.linalg.norm(centres - np.array(n["center_mm"]), axis=1)
            tumour &= d > max(n["diameter_mm"] / 2, 2.5)
    rows = []
    for t in thresholds:
        above = final & (score >= t)
        found = 0
        big = [n for n in inserted if n["diameter_mm"] >= 5.0]
        for n in big:
            d = np.linalg.norm(centres - np.array(n["center_mm"]), axis=1)
            found += bool((above & (d <= max(n["diameter_mm"] / 2, 2.5))).any())
        rows.append(
            {
                "threshold": t,
                "false": int((above & (label == 0)).sum()),
                "found": found,
                "nodules": len(big),
                "tumour": bool((above & tumour).any()) if tumour.any() else None,
            }
        )
    return {"scan": path.stem, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+")
    args = ap.parse_args(argv)
    stats = [scan_stats(p) for f in args.folders for p in sorted(f.glob("*.npz"))]
    print(f"{len(stats)} scans")
    print(f"{'threshold':>9} {'FP/scan':>8} {'max FP':>6} {'found >= 5 mm':>14} {'tumour scans found':>19}")
    for i, t in enumerate(THRESHOLDS):
        fp = [s["rows"][i]["false"] for s in stats]
        found = sum(s["rows"][i]["found"] for s in stats)
        nod = sum(s["rows"][i]["nodules"] for s in stats)
        tum = [s["rows"][i]["tumour"] for s in stats if s["rows"][i]["tumour"] is not None]
        print(
            f"{t:9.3f} {np.mean(fp):8.2f} {max(fp):6d} {found:>6}/{nod:<4} {found / max(nod, 1):5.2f}"
            f" {sum(tum):>8}/{len(tum)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
