"""Resampling a volume onto a uniform grid along the slice normal, and mapping results back.

A :class:`~workers.volume.Volume` keeps gantry tilt and variable spacing as they are (``uniform``
is False). A detector that needs an even grid runs on :func:`uniform_grid`, which interpolates
between the source slices around each grid plane, and maps its grid results back to source
slice indices (:meth:`UniformGrid.to_source_index`, :meth:`UniformGrid.mask_to_source`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.geometry import evenly_spaced
from workers.volume import Volume, VolumeError


@dataclass
class UniformGrid:
    """A volume resampled to even spacing along the normal, with the way back to source slices.

    ``array[m]`` lies at ``offsets[m]`` along the normal. For an already uniform volume the
    array is the volume's own (no copy) and the mapping is the identity.
    """

    array: np.ndarray
    offsets: np.ndarray
    spacing: float
    source_offsets: np.ndarray
    identity: bool

    def to_source_index(self, m: float | np.ndarray) -> float | np.ndarray:
        """Fractional source slice index of grid index ``m``."""
        if self.identity:
            return m
        off = np.interp(m, np.arange(len(self.offsets)), self.offsets)
        return np.interp(
            off, self.source_offsets, np.arange(len(self.source_offsets), dtype=np.float64)
        )

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """Map a grid mask to source slices: each source slice takes the nearest grid slice."""
        if self.identity:
            return mask
        idx = np.rint((self.source_offsets - self.offsets[0]) / self.spacing).astype(int)
        idx = np.clip(idx, 0, mask.shape[0] - 1)
        return mask[idx]


def uniform_grid(
    volume: Volume, spacing: float | None = None, *, max_gap_mm: float | None = None
) -> UniformGrid:
    """Resample ``volume`` along the normal to even ``spacing`` (default: the median spacing).

    Linear interpolation between the two source slices around each grid plane. In-plane gantry
    tilt shear is left as it is (detectors work in index space; patient coordinates always go
    through :meth:`Volume.index_to_patient`). Raises :class:`VolumeError` when two adjacent
    slices are more than ``max_gap_mm`` apart (missing images).
    """
    offsets = volume.slice_offsets
    gaps = np.diff(offsets)
    if max_gap_mm is not None and gaps.size and float(gaps.max()) > max_gap_mm:
        raise VolumeError(
            f"gap of {gaps.max():.2f} mm between adjacent slices exceeds {max_gap_mm:.2f} mm "
            "(missing images?)"
        )
    spacing = float(spacing or volume.slice_spacing)
    if evenly_spaced(gaps, spacing):
        return UniformGrid(volume.array, offsets, spacing, offsets, identity=True)
    count = int(np.floor((offsets[-1] - offsets[0]) / spacing + 1e-6)) + 1
    grid = offsets[0] + spacing * np.arange(count)
    pos = np.interp(grid, offsets, np.arange(len(offsets), dtype=np.float64))
    k0 = np.clip(np.floor(pos).astype(int), 0, len(offsets) - 1)
    k1 = np.minimum(k0 + 1, len(offsets) - 1)
    t = (pos - k0).astype(np.float32)
    out = np.empty((count, *volume.array.shape[1:]), dtype=np.float32)
    for m in range(count):
        if t[m] == 0 or k0[m] == k1[m]:
            out[m] = volume.array[k0[m]]
        else:
            np.multiply(volume.array[k0[m]], 1 - t[m], out=out[m])
            out[m] += t[m] * volume.array[k1[m]]
    return UniformGrid(out, grid, spacing, offsets, identity=False)
