"""A CT series as a volume, with the geometry the encoders need to map results back exactly.

Contract used across ``workers``:

* ``array[k]`` is the pixel data of source slice ``slices[k]`` (rescaled to HU, float32), so a
  mask with the array's shape maps one-to-one onto source instances (SEG frames, SR key slices).
* Slices are sorted by position along the slice normal (never by InstanceNumber).
* ``positions[k]`` is that slice's ImagePositionPatient; ``affine`` maps (k, j, i, 1) to patient
  (x, y, z, 1) in mm when the spacing is uniform; for gantry tilt or variable spacing the
  per-slice ``positions`` are authoritative.

The loader (``load_series``) is implemented in this module by the volume-loading work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SourceSlice:
    """One source image (or frame of a multi-frame instance) behind ``array[k]``."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None
    """1-based frame number for multi-frame instances, None for single-frame."""
    path: str | None
    """Where the instance was read from (spool path or cache), if a file."""


@dataclass
class Volume:
    array: np.ndarray
    """float32 (k, j, i) in HU."""
    slices: list[SourceSlice]
    positions: np.ndarray
    """(K, 3) ImagePositionPatient per slice, mm."""
    orientation: np.ndarray
    """(6,) ImageOrientationPatient (row direction cosines, then column)."""
    pixel_spacing: tuple[float, float]
    """(row spacing, column spacing) mm."""
    slice_spacing: float
    """Median distance between adjacent slice centres along the normal, mm."""
    affine: np.ndarray
    """(4, 4) index (k, j, i) -> patient (x, y, z) for the uniform case."""
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    uniform: bool = True
    """False when slice spacing varies or slices are tilted relative to their normal."""
    headers: list[Any] = field(default_factory=list, repr=False)
    """pydicom Datasets without pixel data, aligned with ``slices`` (for encoders)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return int(k), int(j), int(i)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    def index_to_patient(self, k: float, j: float, i: float) -> tuple[float, float, float]:
        """Patient coordinates of a (possibly fractional) voxel index, honouring per-slice IPP."""
        row_dir = self.orientation[:3]
        col_dir = self.orientation[3:]
        k0 = int(np.clip(np.floor(k), 0, len(self.positions) - 1))
        k1 = min(k0 + 1, len(self.positions) - 1)
        t = float(k) - k0
        origin = (1 - t) * self.positions[k0] + t * self.positions[k1]
        # IOP row cosine runs along columns (i), column cosine along rows (j).
        p = origin + i * self.pixel_spacing[1] * row_dir + j * self.pixel_spacing[0] * col_dir
        return float(p[0]), float(p[1]), float(p[2])
