"""What is known about one scan: its positives, its ignore regions, and how to load its volume.

Every reader (:mod:`.truth` for ``truth.json``, :mod:`.lidc` for LIDC XML readings,
:mod:`.luna16` for the LUNA16 CSV files) turns its input into :class:`Reference` objects; the
runner and the metrics only ever see these. Coordinates are DICOM patient LPS mm throughout.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.models.base import InputRequirements
    from workers.volume import Volume

IGNORE_MIN_RADIUS_MM = 5.0
"""An ignore mark's region is a ball of max(its radius, this) around it. A mark of unknown size
(a < 3 mm nodule is a single point; a non-nodule a single point) gets a 10 mm ball, as the
LUNA16 evaluation script does for its excluded marks without a diameter."""

Loader = Callable[["InputRequirements"], "Volume"]


class SkipScan(Exception):
    """The scan cannot be evaluated with this detector (its series is refused); the message
    says why, without patient data."""


@dataclass
class Reference:
    """One scan's reference standard."""

    name: str
    """How the report names the scan: a series UID, or a synth study's folder name."""
    kind: str
    """``synth``, ``real-chest-ct``, ``lidc`` or ``luna16``."""
    positives: list[dict[str, Any]]
    """``center_mm``, ``diameter_mm``; optional ``type``, ``boxes_mm`` ([[lo], [hi]] per box),
    ``readers``."""
    ignore: list[dict[str, Any]]
    """``center_mm``, ``radius_mm``, ``why``."""
    load: Loader = field(repr=False)
    """Loads the volume a model with the given input requirements would see."""


def ignore_region(
    center_mm: Sequence[float], diameter_mm: float | None, why: str
) -> dict[str, Any]:
    """An ignore region around a mark: radius max(diameter / 2, 5 mm)."""
    radius = max((diameter_mm or 0.0) / 2, IGNORE_MIN_RADIUS_MM)
    return {
        "center_mm": [round(float(c), 2) for c in center_mm],
        "radius_mm": round(radius, 2),
        "why": why,
    }


def dicom_files(folder: Path, skip: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    """The files under ``folder`` that may be DICOM (hidden files and ``skip`` ones left out)."""
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and not skip(path):
                out.append(path)
    return out


def read_series_headers(
    files: Sequence[Path],
) -> tuple[dict[str, list[Any]], dict[str, list[Path]]]:
    """Headers (no pixel data) and paths of the DICOM files, grouped by SeriesInstanceUID;
    files that are not DICOM are passed over."""
    from workers.volume import read_header

    headers: dict[str, list[Any]] = {}
    paths: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = read_header(f)
        except Exception:  # not DICOM (a README, an XML reading): not part of any series
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        headers.setdefault(uid, []).append(ds)
        paths.setdefault(uid, []).append(f)
    return headers, paths


def dicom_loader(files: Sequence[Path], series_uid: str | None = None) -> Loader:
    """A loader for the series among ``files`` that a model would choose (the worker's own
    series selection), which must be ``series_uid`` when given."""

    def load(requirements: InputRequirements) -> Volume:
        from workers.selection import select_series
        from workers.volume import load_series

        headers, paths = read_series_headers(files)
        chosen = select_series(headers, requirements)
        if chosen.series_instance_uid is None:
            raise SkipScan(f"no series qualifies ({'; '.join(chosen.reasons.values())})")
        if series_uid is not None and chosen.series_instance_uid != series_uid:
            reason = chosen.reasons.get(series_uid, "the model chose another series")
            raise SkipScan(f"the annotated series is not the one the model takes ({reason})")
        return load_series(paths[chosen.series_instance_uid])

    return load
