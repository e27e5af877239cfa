"""Stage-2 training data from real lungs with simulated nodules inserted (positives and
negatives in the same real images; see :mod:`training.insert_nodules` for why).

For each scan and each of ``--rounds`` rounds, up to ``--per-round`` nodules are inserted (a
new random draw per round), the detector's stages 1-5 run on the result, and
``<out>/<scan>-r<round>.npz`` is written in the form of :mod:`training.real_negatives` with the
labels: 1 within max(radius, 2.5 mm) of an inserted nodule or on the scan's known tumour, -1
within 5 mm beyond an inserted nodule's radius or near the tumour or an ignore mark (neither), 0
elsewhere; plus ``inserted`` (JSON of what went where).

Held-out scans (:data:`training.real_negatives.HELD_OUT`) are refused: what this writes is for
training.

    .venv/bin/python -m training.real_inserted --out /tmp/realins --rounds 4 --per-round 10 \\
        ../shared/data/real-chest-ct/lung-pet-ct-dx-*
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.insert_nodules import Inserted, insert
from training.real_negatives import HELD_OUT, labels_of, load, mine_volume
from workers.evaluate.truth import tumour_positive
from workers.models.lung_nodules import LungNoduleDetector


def inserted_labels(base: np.ndarray, centres: np.ndarray, placed: list[Inserted]) -> np.ndarray:
    """``base`` labels with the inserted nodules' positives and their neither-zones."""
    out = base.copy()
    for n in placed:
        d = np.linalg.norm(centres - np.array(n.center_mm), axis=1)
        r = n.diameter_mm / 2
        out[(d <= r + 5.0) & (out == 0)] = -1
        out[d <= max(r, 2.5)] = 1
    return out


def avoid_boxes(folder: Path, margin_mm: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The tumour boxes widened by ``margin_mm`` (LPS mm): nothing is inserted there."""
    truth = json.loads((folder / "truth.json").read_text())
    if not truth.get("tumour_boxes"):
        return []
    boxes = tumour_positive(truth["tumour_boxes"])["boxes_mm"]
    return [(np.array(lo) - margin_mm, np.array(hi) + margin_mm) for lo, hi in boxes]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scans", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", type=Path, help="FP-reduction card (default: the shipped one)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--margin", type=float, default=15.0, help="mm around the tumour: neither")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    detector = LungNoduleDetector(device="cpu", weights=args.weights)
    for index, folder in enumerate(args.scans):
        if folder.name in HELD_OUT:
            raise SystemExit(f"{folder.name} is held out for reporting; it must not be trained on")
        volume = load(folder)
        base = detector.candidates(volume)
        avoid = avoid_boxes(folder, 20.0)
        for rnd in range(args.rounds):
            t = time.perf_counter()
            rng = np.random.default_rng([args.seed, index, rnd])
            vol, placed = insert(
                volume, base.mask, base.source_ijk, base.spacing, rng, args.per_round, avoid_mm=avoid
            )
            data = mine_volume(
                vol,
                detector,
                lambda c, p=placed, f=folder: inserted_labels(labels_of(f, c, args.margin), c, p),
            )
            data.pop("_volume")
            data["tumour"] = labels_of(folder, data["centre_mm"], args.margin) == 1
            data["inserted"] = np.array(json.dumps([p.as_truth() for p in placed]))
            np.savez_compressed(args.out / f"{folder.name}-r{rnd}.npz", **data)
            lab = data["label"]
            fin = data["final"] & (data["merged"] >= detector.threshold)
            found = sum(
                bool(
                    (
                        fin
                        & (
                            np.linalg.norm(data["centre_mm"] - np.array(p.center_mm), axis=1)
                            <= max(p.diameter_mm / 2, 2.5)
                        )
                    ).any()
                )
                for p in placed
            )
            print(
                f"{folder.name} r{rnd}: {len(placed)} inserted, {found} found at the operating point, "
                f"{int((lab == 1).sum())} positive / {int((lab == 0).sum())} negative candidates, "
                f"{time.perf_counter() - t:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
