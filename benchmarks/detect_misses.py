"""Where the built-in ``lung-nodules`` detector loses nodules: for each nodule of a set of
studies with ground truth, the last stage it survives.

A development tool for the FP-reduction work, not a benchmark: run it on development phantoms
(seeds below 9000, e.g. ``dicom-node synth dev --seed 3001 --count 20``), never on the
benchmark's 9001-9020, or the benchmark stops being held out.

For every nodule of the chosen subset (LUNA16 hits: a candidate within the nodule's radius):

* ``no candidate``  no LoG peak within its radius (stages 1-4);
* ``stage 1``       peaks, but none among the candidates stage 1 passes to the patch CNN;
* ``radius NMS``    every scored peak lies within a better-scored candidate's radius;
* ``object NMS``    every one left lies on a better-scored candidate's segmented object;
* otherwise its best score, and the FP/scan at which the FROC finds it (false positives of
  all the studies scoring at least as much, per study), next to its best stage-2 score.

    .venv/bin/python benchmarks/detect_misses.py dev/seed-30* [--weights CARD] [--subset all_ge_4mm]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from workers.evaluate import SUBSETS  # noqa: E402  (the repository must be on sys.path first when run as a script)

MAX_LISTED = 500  # the detector lists at most this many candidates per study for the FROC


@dataclass
class NoduleFate:
    study: str
    type: str
    diameter_mm: float
    lost_at: str | None
    """The stage that dropped its last candidate; None when it reaches the final list."""
    peaks: int
    best_stage2: float | None
    score: float | None
    fp_per_scan: float | None
    """False positives per study at its score (where the FROC finds it)."""
    chosen: bool
    """In the subset asked for."""


def study_fates(detector: Any, folder: Path, select: Any) -> tuple[list[NoduleFate], list[float]]:
    """The fate of every nodule of one study, and the scores of its false positives."""
    from workers.evaluate import load_study
    from workers.models.lung_nodules import FROC_FLOOR

    volume, nodules = load_study(folder, detector.requirements)
    cands = detector.candidates(volume)
    ranking = detector.rank(cands)
    src = cands.source_ijk()
    mm = np.array([volume.index_to_patient(*p) for p in src], dtype=np.float64).reshape(-1, 3)
    listed = ranking.final[ranking.scores[ranking.final] >= FROC_FLOOR]
    listed = listed[np.argsort(-ranking.scores[listed], kind="stable")][:MAX_LISTED]
    stage2 = np.full(len(mm), np.nan)
    stage2[ranking.scored] = ranking.stage2
    near = np.zeros((len(mm), len(nodules)), dtype=bool)
    for k, n in enumerate(nodules):
        near[:, k] = np.linalg.norm(mm - np.asarray(n["center_mm"]), axis=1) <= max(float(n["diameter_mm"]) / 2, 1e-6)
    fp_scores = [float(ranking.scores[i]) for i in listed if not near[i].any()]
    fates = []
    for k, n in enumerate(nodules):
        hits = np.flatnonzero(near[:, k])
        stages = (
            ("no candidate", hits),
            ("stage 1", np.intersect1d(hits, ranking.scored)),
            ("radius NMS", np.intersect1d(hits, ranking.kept)),
            ("object NMS", np.intersect1d(hits, listed)),
        )
        lost_at = next((name for name, left in stages if len(left) == 0), None)
        scored = stages[1][1]
        fates.append(
            NoduleFate(
                study=folder.name,
                type=str(n.get("type", "")),
                diameter_mm=round(float(n["diameter_mm"]), 1),
                lost_at=lost_at,
                peaks=len(hits),
                best_stage2=round(float(np.max(stage2[scored])), 4) if len(scored) else None,
                score=round(float(np.max(ranking.scores[stages[3][1]])), 4) if lost_at is None else None,
                fp_per_scan=None,
                chosen=bool(select(n)),
            )
        )
    return fates, fp_scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", type=Path, help="folders holding a series and its truth.json")
    ap.add_argument("--weights", type=Path, help="FP-reduction weights card (default: the shipped one)")
    ap.add_argument("--subset", choices=sorted(SUBSETS), default="solid_ge_5mm")
    ap.add_argument("--fp", type=float, default=1.0, help="FP/scan budget a nodule counts as found within (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write every nodule's fate here")
    args = ap.parse_args()

    from workers.evaluate import find_studies
    from workers.models.lung_nodules import LungNoduleDetector

    detector = LungNoduleDetector(weights=args.weights, options={"threads": args.threads})
    studies = find_studies(args.studies)
    if not studies:
        print("no folder with a truth.json among the arguments", file=sys.stderr)
        return 2
    fates: list[NoduleFate] = []
    fp_scores: list[float] = []
    for n, folder in enumerate(studies, 1):
        of_study, fp = study_fates(detector, folder, SUBSETS[args.subset])
        fates += of_study
        fp_scores += fp
        print(f"  [{n}/{len(studies)}] {folder.name}: {len(of_study)} nodules, {len(fp)} false positives listed", flush=True)
    fp_sorted = np.sort(np.array(fp_scores))
    for f in fates:
        if f.score is not None:
            # Ties count against the nodule, as in the FROC (one threshold admits them all).
            f.fp_per_scan = round(float(len(fp_sorted) - np.searchsorted(fp_sorted, f.score)) / len(studies), 3)
    chosen = [f for f in fates if f.chosen]
    found = [f.fp_per_scan is not None and f.fp_per_scan <= args.fp for f in chosen]
    missed = [f for f, ok in zip(chosen, found, strict=True) if not ok]
    print(f"\n{args.subset}: {sum(found)} of {len(chosen)} found within {args.fp:g} FP/scan "
          f"({len(studies)} studies, {len(fp_scores)} false positives listed)")
    for stage in ("no candidate", "stage 1", "radius NMS", "object NMS"):
        print(f"  lost at {stage:13s} {sum(f.lost_at == stage for f in chosen)}")
    print(f"  scored too low       {sum(f.lost_at is None for f in missed)}")
    print("\nnot found within the budget:")
    for f in sorted(missed, key=lambda f: (f.fp_per_scan is None, f.fp_per_scan or 0.0)):
        where = f.lost_at or f"found at {f.fp_per_scan:g} FP/scan, score {f.score}"
        print(f"  {f.study:18s} {f.type:13s} {f.diameter_mm:5.1f} mm  peaks {f.peaks:2d}  "
              f"stage 2 {f.best_stage2 if f.best_stage2 is not None else '-':>6}  {where}")
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in fates], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
