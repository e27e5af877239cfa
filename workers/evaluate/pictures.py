"""What the model saw: an axial crop around each false finding and each missed positive.

One PNG per point: the slice through it, lung window, 256 x 256 pixels, with a box of the
positive's size (or 10 mm around a false finding) and a one-line caption (what it is, score or
size). No patient data: the pictures hold pixels and the caption only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.preview import LUNG_WINDOW

if TYPE_CHECKING:
    from workers.volume import Volume

SIZE_PX = 256
MIN_FIELD_MM = 48.0
FINDING_BOX_MM = 10.0
FALSE_COLOUR = (255, 48, 48)
MISS_COLOUR = (255, 200, 0)


def axial_crop(
    volume: Volume,
    center_mm: Sequence[float],
    box_mm: float,
    caption: str,
    colour: tuple[int, int, int],
    path: Path,
) -> Path:
    """Write the axial crop around ``center_mm`` (LPS mm) with a ``box_mm`` square to ``path``."""
    from PIL import Image, ImageDraw

    k, j, i = volume.patient_to_index(*(float(c) for c in center_mm))
    k_idx = int(np.clip(round(k), 0, volume.shape[0] - 1))
    field_mm = max(MIN_FIELD_MM, 3 * box_mm)
    row_mm, col_mm = volume.pixel_spacing
    half_j, half_i = field_mm / 2 / row_mm, field_mm / 2 / col_mm
    j0, i0 = round(j - half_j), round(i - half_i)
    j1, i1 = round(j + half_j), round(i + half_i)
    crop = np.full((j1 - j0, i1 - i0), -1000.0, dtype=np.float32)  # air outside the image
    rows, cols = volume.shape[1:]
    a, b = max(j0, 0), min(j1, rows)
    c, d = max(i0, 0), min(i1, cols)
    if a < b and c < d:
        crop[a - j0 : b - j0, c - i0 : d - i0] = volume.array[k_idx, a:b, c:d]
    width, level = LUNG_WINDOW
    grey = np.clip((crop - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    img = Image.fromarray(grey).convert("RGB").resize((SIZE_PX, SIZE_PX))
    draw = ImageDraw.Draw(img)
    # The crop spans field_mm in both directions, so one mm is the same number of output pixels.
    px_per_mm = SIZE_PX / field_mm
    cy = (j - j0) / (j1 - j0) * SIZE_PX
    cx = (i - i0) / (i1 - i0) * SIZE_PX
    h = box_mm / 2 * px_per_mm
    draw.rectangle((cx - h, cy - h, cx + h, cy + h), outline=colour, width=2)
    # Captions on black strips: readable over bone and soft tissue as well as over lung.
    draw.rectangle((0, 0, SIZE_PX, 15), fill=(0, 0, 0))
    draw.rectangle((0, SIZE_PX - 16, SIZE_PX, SIZE_PX), fill=(0, 0, 0))
    draw.text((4, 2), caption, fill=colour)
    draw.text((4, SIZE_PX - 14), f"slice {k_idx + 1}/{volume.shape[0]}", fill=(200, 200, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def draw_scan(
    volume: Volume,
    index: int,
    false_findings: Sequence[tuple[Sequence[float], float]],
    misses: Sequence[dict[str, Any]],
    folder: Path,
) -> dict[str, list[str]]:
    """One PNG per false finding (centre, score) and per missed positive of scan ``index``;
    returns the file names (relative to ``folder``) in the same order."""
    out: dict[str, list[str]] = {"false": [], "miss": []}
    for n, (centre, score) in enumerate(false_findings, start=1):
        name = f"scan{index:03d}-false-{n:02d}.png"
        axial_crop(
            volume,
            centre,
            FINDING_BOX_MM,
            f"false finding {score:.3f}",
            FALSE_COLOUR,
            folder / name,
        )
        out["false"].append(name)
    for n, positive in enumerate(misses, start=1):
        name = f"scan{index:03d}-miss-{n:02d}.png"
        d = float(positive["diameter_mm"])
        axial_crop(
            volume, positive["center_mm"], d, f"missed {d:.1f} mm", MISS_COLOUR, folder / name
        )
        out["miss"].append(name)
    return out
