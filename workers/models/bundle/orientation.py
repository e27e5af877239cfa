"""Geometry between the node's volumes (DICOM LPS, source slices) and a bundle's images (MONAI
MetaTensors with a RAS affine): the one place where axes, orientation and spacing conventions
meet.

* DICOM patient coordinates are LPS (PS3.3 C.7.6.2.1.1); NIfTI and MONAI's ``Orientationd`` /
  ``Spacingd`` work with an affine in RAS (``LoadImage`` with ``affine_lps_to_ras``). The two
  differ by the sign of x and y: :data:`LPS_TO_RAS`.
* A :class:`~workers.volume.Volume` is indexed (k, j, i) = (slice, row, column); a MONAI image
  is (x, y, z) = (i, j, k), channel first. The affine built here maps (x, y, z) to RAS mm.
* Tilted and unevenly spaced series go through :func:`workers.grid.uniform_grid` first (even
  spacing along the slice normal); gantry tilt stays in the affine as a shear, which
  ``Spacingd`` keeps. Results come back through patient coordinates
  (:meth:`Volume.patient_to_index`, exact for tilt and uneven spacing) or, for label maps, through
  the grid (:meth:`UniformGrid.mask_to_source`), so every finding lands on source slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.grid import UniformGrid, uniform_grid
from workers.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flips x and y; its own inverse (RAS -> LPS is the same matrix)."""


@dataclass
class BundleInput:
    """A volume as a bundle's image: (x, y, z) array in HU and its RAS affine."""

    array: np.ndarray
    """float32 (x, y, z) = (column, row, grid slice)."""
    affine_ras: np.ndarray
    """(4, 4) index (x, y, z) -> RAS mm."""
    grid: UniformGrid
    """The even grid along the normal the array lies on (identity for even, untilted series)."""


def flip_lps_ras(points: np.ndarray) -> np.ndarray:
    """LPS <-> RAS for (N, 3) points (the same flip both ways)."""
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., :2] *= -1.0
    return out


def grid_affine_lps(volume: Volume, grid: UniformGrid) -> np.ndarray:
    """(4, 4) index (x, y, z) = (i, j, m) of ``grid`` -> LPS mm.

    The step between grid planes follows the line the slice positions lie on (along the normal
    for a straight series, sheared for gantry tilt), scaled to the grid spacing.
    """
    affine = np.eye(4)
    affine[:3, 0] = volume.orientation[:3] * volume.pixel_spacing[1]
    affine[:3, 1] = volume.orientation[3:] * volume.pixel_spacing[0]
    positions = np.asarray(volume.positions, dtype=np.float64)
    offsets = volume.slice_offsets
    if len(positions) > 1 and offsets[-1] > offsets[0]:
        per_mm = (positions[-1] - positions[0]) / (offsets[-1] - offsets[0])
    else:
        per_mm = volume.normal
    affine[:3, 2] = per_mm * grid.spacing
    affine[:3, 3] = positions[0] + per_mm * (grid.offsets[0] - offsets[0])
    return affine


def to_bundle_input(volume: Volume) -> BundleInput:
    """The volume on an even grid, as (x, y, z) with its RAS affine (what ``LoadImaged`` with
    ``affine_lps_to_ras`` would give for the same series read from files)."""
    grid = uniform_grid(volume)
    array = np.ascontiguousarray(np.transpose(grid.array, (2, 1, 0)), dtype=np.float32)
    return BundleInput(array, LPS_TO_RAS @ grid_affine_lps(volume, grid), grid)


def image_to_lps(affine_ras: Any, points_xyz: np.ndarray) -> np.ndarray:
    """Voxel coordinates (N, 3) of an image with a RAS affine -> LPS mm."""
    a = np.asarray(affine_ras, dtype=np.float64)
    pts = np.asarray(points_xyz, dtype=np.float64)
    ras = pts @ a[:3, :3].T + a[:3, 3]
    return flip_lps_ras(ras)


def lps_to_source(volume: Volume, points_lps: np.ndarray) -> np.ndarray:
    """LPS points (N, 3) -> fractional source indices (N, 3) as (k, j, i)."""
    return np.array([volume.patient_to_index(*map(float, p)) for p in np.atleast_2d(points_lps)])


def onto_input_grid(labels: Any, reference: Any) -> Any:
    """A (1, x, y, z) label MetaTensor on the bundle's grid -> on the input's grid (nearest),
    for bundles whose postprocessing has no ``Invertd``. ``reference`` is the input image
    (channel first, with its affine)."""
    from monai.transforms import ResampleToMatch

    return ResampleToMatch(mode="nearest")(labels.float(), img_dst=reference)


def label_map_to_source(bundle_input: BundleInput, labels_xyz: np.ndarray) -> np.ndarray:
    """A label map on the bundle input's grid (x, y, z) -> one on the source slices (k, j, i)."""
    on_grid = np.transpose(np.asarray(labels_xyz), (2, 1, 0))
    return np.ascontiguousarray(bundle_input.grid.mask_to_source(on_grid))
