"""Turning a per-object mask into a :class:`~workers.findings.Finding`: centre, key slice, 2D box,
long-axis diameter and volume, measured the way radiologists measure nodules.

Shared by the built-in detector and the TorchScript runtime, so every model reports the same
quantities in the same way.
"""

from __future__ import annotations

import contextlib

import numpy as np

from workers.findings import DIAMETER, MM, NODULE, CodedConcept, Finding, Measurement
from workers.volume import Volume


def slice_volumes_mm3(volume: Volume) -> np.ndarray:
    """(K,) volume of one voxel of each slice, using the local slice spacing (uneven series)."""
    offsets = volume.slice_offsets
    if len(offsets) == 1:
        thick = volume.slice_thickness or volume.slice_spacing
        return np.array([thick * volume.pixel_spacing[0] * volume.pixel_spacing[1]])
    gaps = np.diff(offsets)
    # Each slice stands for half the gap to each neighbour.
    local = np.empty(len(offsets))
    local[0] = gaps[0]
    local[-1] = gaps[-1]
    local[1:-1] = 0.5 * (gaps[:-1] + gaps[1:])
    return local * volume.pixel_spacing[0] * volume.pixel_spacing[1]


def long_axis_2d(mask2d: np.ndarray, pixel_spacing: tuple[float, float]) -> float:
    """Longest in-plane distance (mm) between two pixels of a 2D mask (pixel-centre to
    pixel-centre plus one pixel, so a single pixel measures one pixel across)."""
    jj, ii = np.nonzero(mask2d)
    if jj.size == 0:
        return 0.0
    pts = np.stack([jj * pixel_spacing[0], ii * pixel_spacing[1]], axis=1)
    if len(pts) > 400:
        # The longest chord runs between points of the convex hull; the boundary is enough.
        from scipy.spatial import ConvexHull, QhullError

        with contextlib.suppress(QhullError):  # degenerate (collinear) sets
            pts = pts[ConvexHull(pts).vertices]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    return float(d.max() + 0.5 * (pixel_spacing[0] + pixel_spacing[1]))


def finding_from_mask(
    volume: Volume,
    mask: np.ndarray,
    confidence: float,
    *,
    label: CodedConcept = NODULE,
    site: CodedConcept | None = None,
    kind: str | None = None,
    offset: tuple[int, int, int] = (0, 0, 0),
    centre_ijk: tuple[float, float, float] | None = None,
) -> Finding | None:
    """Measure one object. ``mask`` may be a crop of the volume placed at ``offset`` (k, j, i).

    The finding's mask is volume-shaped (``np.zeros``: untouched pages cost no memory).
    Returns None for an empty mask.
    """
    if not mask.any():
        return None
    k0, j0, i0 = offset
    kk, jj, ii = np.nonzero(mask)
    per_slice = np.bincount(kk, minlength=mask.shape[0])
    key_local = int(np.argmax(per_slice))
    key = key_local + k0
    key_mask = mask[key_local]
    kj, ki = np.nonzero(key_mask)
    bbox = (float(ki.min() + i0), float(kj.min() + j0), float(ki.max() + i0 + 1), float(kj.max() + j0 + 1))
    if centre_ijk is None:
        centre_ijk = (float(kk.mean() + k0), float(jj.mean() + j0), float(ii.mean() + i0))
    voxel_mm3 = slice_volumes_mm3(volume)
    vol_mm3 = float((per_slice * voxel_mm3[k0 : k0 + mask.shape[0]]).sum())
    diameter = long_axis_2d(key_mask, volume.pixel_spacing)
    full = np.zeros(volume.shape, dtype=bool)
    full[k0 : k0 + mask.shape[0], j0 : j0 + mask.shape[1], i0 : i0 + mask.shape[2]] |= mask
    return Finding(
        label=label,
        site=site,
        confidence=float(np.clip(confidence, 0.0, 1.0)),
        center_ijk=centre_ijk,
        center_mm=volume.index_to_patient(*centre_ijk),
        key_slice=key,
        bbox_2d=bbox,
        diameter_mm=diameter,
        volume_mm3=vol_mm3,
        mask=full,
        kind=kind,
        # Long axis and volume are Finding fields (the SR writes them); this is the extra one.
        measurements=[Measurement(DIAMETER, round(float(np.cbrt(6.0 * vol_mm3 / np.pi)), 3), MM)],
    )
