"""``truth.json`` beside a DICOM series: the phantom truth ``dicom-node synth`` writes, and the
reference files of the real chest CT collection (``positives``, ``ignore``, ``tumour_boxes``).

* synth: ``{"format": "dicom-node-synth/1", "nodules": [{"center_mm", "diameter_mm", "type"}]}``;
  every nodule is a positive.
* real chest CT: ``positives`` (``center_mm``, ``diameter_mm``) are positives; each ``ignore``
  mark is an ignore region of radius max(its radius, 5 mm); ``tumour_boxes`` (one box per slice,
  ``box_mm_lps`` = two LPS corners in that slice's plane) together make one positive, hit by a
  finding inside any box widened by half the slice spacing along z.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from workers.evaluate.references import Reference, dicom_files, dicom_loader, ignore_region

TRUTH_FILE = "truth.json"
DEFAULT_HALF_SLICE_MM = 2.5
"""Half the slice spacing assumed for a tumour boxed on one slice only."""


def tumour_positive(boxes: list[dict[str, Any]]) -> dict[str, Any]:
    """One positive from a tumour's per-slice boxes: the boxes widened along z by half the
    spacing of the boxed slices; centre and diameter from their union (for the pictures)."""
    corners = np.array([b["box_mm_lps"] for b in boxes], dtype=np.float64)  # (n, 2, 3)
    zs = np.unique(np.round(corners[:, :, 2], 3))
    half = float(np.median(np.diff(zs))) / 2 if len(zs) > 1 else DEFAULT_HALF_SLICE_MM
    widened = []
    for lo, hi in corners:
        a, b = np.minimum(lo, hi), np.maximum(lo, hi)
        widened.append([[a[0], a[1], a[2] - half], [b[0], b[1], b[2] + half]])
    w = np.array(widened)
    lo, hi = w[:, 0].min(axis=0), w[:, 1].max(axis=0)
    return {
        "center_mm": [round(float(c), 2) for c in (lo + hi) / 2],
        "diameter_mm": round(float(max(hi[0] - lo[0], hi[1] - lo[1])), 2),
        "type": "tumour",
        "boxes_mm": [[[round(float(v), 2) for v in c] for c in box] for box in widened],
    }


def read_truth(folder: Path) -> Reference:
    """The reference of the study in ``folder`` (which holds ``truth.json`` and the series)."""
    truth = json.loads((folder / TRUTH_FILE).read_text())
    files = dicom_files(folder, skip=lambda p: p.suffix.lower() in (".json", ".xml", ".md"))
    series_uid = truth.get("series_instance_uid")
    if "nodules" in truth:
        return Reference(
            name=folder.name,
            kind="synth",
            positives=list(truth["nodules"]),
            ignore=[],
            load=dicom_loader(files),
        )
    positives = [
        {
            "center_mm": list(p["center_mm"]),
            "diameter_mm": float(p["diameter_mm"]),
            **({"readers": p["n_readers"]} if "n_readers" in p else {}),
        }
        for p in truth.get("positives", [])
    ]
    if truth.get("tumour_boxes"):
        positives.append(tumour_positive(truth["tumour_boxes"]))
    ignore = [
        ignore_region(m["center_mm"], m.get("diameter_mm"), str(m.get("why", "ignore mark")))
        for m in truth.get("ignore", [])
    ]
    return Reference(
        name=str(series_uid or folder.name),
        kind="real-chest-ct",
        positives=positives,
        ignore=ignore,
        load=dicom_loader(files, series_uid),
    )
