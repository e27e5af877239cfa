"""Hard negatives from real lungs, and what the detector's findings look like there.

For each real chest CT scan given (a folder with ``dicom/`` and ``truth.json``, see
``../shared/data/real-chest-ct/README.md``), runs the built-in detector's stages 1-5 and writes
``<out>/<scan>.npz`` with, for every candidate stage 2 scored:

* ``points``, ``offsets``, ``radius_mm``, ``features`` (the detector's 32), ``stage2`` (its
  score), ``final`` (whether it survived both suppressions), ``centre_mm`` (LPS);
* ``label``: 1 on the known lesion (inside a tumour box), 0 a negative (outside the tumour
  boxes widened by ``--margin`` mm, and not within an ``ignore`` mark's region), -1 otherwise
  (near the tumour or an ignore mark: neither);
* ``shape``: :func:`workers.models.shape_features.shape_features` of the candidate;
* ``patches``: the stage-2 input patches (with the context channels), for fine-tuning.

With ``--pictures``, an axial crop of each final candidate above ``--picture-threshold``.

Which scans go in is the caller's choice: hard negatives for training come from the
Lung-PET-CT-Dx series only; ``lidc-idri-0002`` is held out (``training/finetune_real.py``
refuses to train on it). The thick (5-8 mm) series are read bypassing production series
selection (research: the detector would refuse them).

    .venv/bin/python -m training.real_negatives --out /tmp/realneg \\
        ../shared/data/real-chest-ct/lung-pet-ct-dx-*
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.evaluate.metrics import _inside_boxes, ignored
from workers.evaluate.references import ignore_region
from workers.evaluate.truth import tumour_positive
from workers.models.lung_nodules import LungNoduleDetector
from workers.models.shape_features import shape_features
from workers.volume import Volume, load_series

HELD_OUT = ("lidc-idri-0002",)
"""Scans no training or tuning step may use (the benchmark reports on them)."""


def load(folder: Path) -> Volume:
    """The scan's series, loaded directly (research: no series selection, thick slices too)."""
    return load_series(sorted((folder / "dicom").glob("*.dcm")))


def labels_of(folder: Path, centres_mm: np.ndarray, margin_mm: float) -> np.ndarray:
    """1 on the tumour, 0 a negative, -1 neither (see the module docstring)."""
    truth = json.loads((folder / "truth.json").read_text())
    out = np.zeros(len(centres_mm), dtype=np.int8)
    if truth.get("tumour_boxes"):
        boxes = tumour_positive(truth["tumour_boxes"])["boxes_mm"]
        wide = [[[v - margin_mm for v in lo], [v + margin_mm for v in hi]] for lo, hi in boxes]
        out[_inside_boxes(centres_mm, wide)] = -1
        out[_inside_boxes(centres_mm, boxes)] = 1
    regions = [
        ignore_region(m["center_mm"], m.get("diameter_mm"), "") for m in truth.get("ignore", [])
    ]
    if regions:
        out[(out == 0) & ignored(centres_mm, regions)] = -1
    if truth.get("positives"):
        raise ValueError(f"{folder.name}: scans with positives are not handled here")
    return out


def mine(
    folder: Path, detector: LungNoduleDetector, margin_mm: float, patches: bool = True
) -> dict[str, Any]:
    """Candidates, scores, labels, shape features (and patches) of one scan."""
    volume = load(folder)
    return mine_volume(
        volume, detector, lambda centres: labels_of(folder, centres, margin_mm), patches=patches
    )


def mine_volume(
    volume: Volume,
    detector: LungNoduleDetector,
    label: Callable[[np.ndarray], np.ndarray],
    patches: bool = True,
) -> dict[str, Any]:
    """:func:`mine` of a volume already loaded (e.g. with simulated nodules inserted); ``label``
    gives each candidate centre (LPS mm) its label."""
    cands = detector.candidates(volume)
    ranking = detector.rank(cands)
    which = ranking.scored
    src = cands.source_ijk(cands.points[which] + cands.offsets[which])
    centres = np.array([volume.index_to_patient(*p) for p in src], dtype=np.float64).reshape(-1, 3)
    assert cands.image is not None
    out: dict[str, Any] = {
        "points": cands.points[which],
        "offsets": cands.offsets[which],
        "radius_mm": cands.radius_mm[which],
        "features": cands.features[which],
        "stage2": ranking.stage2,
        "merged": ranking.scores[which],
        "final": np.isin(which, ranking.final),
        "centre_mm": centres,
        "label": label(centres),
        "shape": shape_features(
            cands.image,
            cands.mask,
            cands.spacing,
            cands.points[which],
            cands.radius_mm[which],
            cands.lung_level,
        ),
        "spacing": np.array(cands.spacing),
    }
    if patches:
        clf = detector._classifier
        out["patches"] = (
            detector.patches(cands, which, context=clf.context if clf else None)
            .numpy()
            .astype(np.float16)
        )
    out["_volume"] = volume
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scans", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", type=Path, help="FP-reduction card (default: the shipped one)")
    ap.add_argument(
        "--margin", type=float, default=15.0, help="mm around the tumour boxes that is neither"
    )
    ap.add_argument("--no-patches", action="store_true")
    ap.add_argument("--pictures", action="store_true")
    ap.add_argument("--picture-threshold", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    detector = LungNoduleDetector(device="cpu", weights=args.weights)
    for folder in args.scans:
        t = time.perf_counter()
        data = mine(folder, detector, args.margin, patches=not args.no_patches)
        volume = data.pop("_volume")
        np.savez_compressed(args.out / f"{folder.name}.npz", **data)
        fin = data["final"] & (data["merged"] >= detector.threshold)
        print(
            f"{folder.name}: {len(data['label'])} scored, {int(fin.sum())} findings "
            f"({int((fin & (data['label'] == 0)).sum())} negatives), {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        if args.pictures:
            from workers.evaluate.pictures import axial_crop

            pics = args.out / folder.name
            pics.mkdir(exist_ok=True)
            sel = np.flatnonzero(data["final"] & (data["merged"] >= args.picture_threshold))
            for rank, n in enumerate(sel[np.argsort(-data["merged"][sel])]):
                s = data["shape"][n]
                caption = (
                    f"{rank} lab{int(data['label'][n])} p{data['merged'][n]:.3f} r{data['radius_mm'][n]:.1f} "
                    f"b{s[0]:.2f} t{s[1]:.2f} pl{s[2]:.2f} c{s[6]:.2f} f{int(s[7])} e{s[8]:.2f}"
                )
                axial_crop(
                    volume,
                    data["centre_mm"][n],
                    2 * float(data["radius_mm"][n]),
                    caption,
                    (255, 48, 48),
                    pics / f"{rank:02d}.png",
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
