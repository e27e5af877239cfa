"""A series' images as a stack of slices: which images are slices, and their order.

:func:`order_slices` is the one place that decides, from headers only, which images of a series
make up the volume and in which order: the worker's volume loader (``workers/volume.py``), series
selection (``workers/selection.py``) and the edge's job preview (``dicom_node/preview.py``) all
call it, so a finding's slice index means the same image everywhere. The rules, in order:

1. objects that are not images (SR, SEG, presentation states... see
   :func:`~dicom_node.geometry.plane.is_non_image`) are left out;
2. localizers / scouts (ImageType, or FrameType of an enhanced frame) are left out;
3. images whose plane cannot be read (missing, malformed or undecodable ImagePositionPatient,
   ImageOrientationPatient or PixelSpacing; a multi-frame instance without per-frame planes)
   are left out: a guessed position would put them at the wrong index;
4. only the dominant orientation is kept (a stray reformat or a scout without ImageType is left
   out); gantry tilt is kept, since it tilts the positions, not the orientation;
5. the slices are sorted by position along the slice normal, never by InstanceNumber or file
   order (stable for equal positions);
6. the same image (SOPInstanceUID and frame) twice at one position is kept once; two different
   images at one position are kept and counted in :attr:`SliceOrder.shared_positions`, which
   the loader refuses (several phases in one series).

:func:`stack_spacing` measures the spacing along the normal, whether it is even, and the tilt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.geometry.errors import GeometryError
from dicom_node.geometry.plane import (
    SliceGeometry,
    is_localizer,
    is_non_image,
    slice_geometry,
    slice_normal,
)

POSITION_TOLERANCE_MM = 1e-3
"""Two slices closer than this along the normal are at one position."""

ORIENTATION_TOLERANCE = 2e-3
"""Largest difference of any IOP direction cosine for an image to count as the same orientation."""

SPACING_RELATIVE_TOLERANCE = 0.01
"""Gaps within this fraction (plus 1 micrometre) of the median gap count as even spacing."""

NON_IMAGE = "not an image"
LOCALIZER = "localizer"
NO_GEOMETRY = "no usable geometry"
OTHER_ORIENTATION = "other orientation"
DUPLICATE = "duplicate"

_NOTES = {
    NON_IMAGE: "{n} non-image object(s) left out",
    LOCALIZER: "{n} localizer/scout image(s) left out",
    NO_GEOMETRY: "{n} instance(s) without usable image geometry left out",
    OTHER_ORIENTATION: "{n} image(s) with another orientation left out",
    DUPLICATE: "{n} duplicate image(s) left out",
}


@dataclass(frozen=True)
class LeftOut:
    """An instance (or one frame of it) that is not part of the stack, and why."""

    source: int
    """Index of the instance in the list given to :func:`order_slices`."""
    frame_number: int | None
    reason: str
    """One of NON_IMAGE, LOCALIZER, NO_GEOMETRY, OTHER_ORIENTATION, DUPLICATE."""
    detail: str = ""
    """For NO_GEOMETRY: what cannot be read (an attribute name, never a value)."""


@dataclass(frozen=True, eq=False)
class SliceOrder:
    """The slices of a series in volume order, and what was left out."""

    slices: tuple[SliceGeometry, ...]
    """Sorted by position along :attr:`normal`; index k here is slice k of the volume."""
    offsets: np.ndarray
    """(K,) position of each slice along the normal, mm, non-decreasing."""
    orientation: np.ndarray
    """(6,) mean ImageOrientationPatient of the kept slices (zeros when there are none)."""
    normal: np.ndarray
    """Unit slice normal of :attr:`orientation`."""
    left_out: tuple[LeftOut, ...] = ()
    shared_positions: int = 0
    """Images at the position of a *different* image already in :attr:`slices` (kept)."""

    def count(self, reason: str) -> int:
        """How many instances/frames were left out for ``reason``."""
        return sum(1 for x in self.left_out if x.reason == reason)

    def notes(self) -> list[str]:
        """Patient-free lines saying what was left out, for a volume's or job's notes."""
        counts = Counter(x.reason for x in self.left_out)
        return [text.format(n=counts[r]) for r, text in _NOTES.items() if counts[r]]


def order_slices(headers: Sequence[Dataset]) -> SliceOrder:
    """Decide which images of one series are slices, and their order along the normal.

    ``headers`` are the instances of one series (pixel data not needed). See the module
    docstring for the rules. Never raises for a malformed image: it is left out with a reason.
    """
    left_out: list[LeftOut] = []
    candidates: list[SliceGeometry] = []
    for index, ds in enumerate(headers):
        try:
            if is_non_image(ds):
                left_out.append(LeftOut(index, None, NON_IMAGE))
                continue
            if is_localizer(ds):
                left_out.append(LeftOut(index, None, LOCALIZER))
                continue
            planes = slice_geometry(ds, index)
        except GeometryError as exc:
            # Damaged headers (an element pydicom cannot decode) land here too: never placed.
            left_out.append(LeftOut(index, None, NO_GEOMETRY, str(exc)))
            continue
        for plane in planes:
            if plane.localizer:
                left_out.append(LeftOut(index, plane.frame_number, LOCALIZER))
            else:
                candidates.append(plane)
    if not candidates:
        return SliceOrder((), np.zeros(0), np.zeros(6), np.array([0.0, 0.0, 1.0]), tuple(left_out))

    # The dominant orientation (rounded to 3 decimals to count), then everything close to it.
    counted = Counter(tuple(np.round(p.orientation, 3)) for p in candidates)
    dominant = np.array(counted.most_common(1)[0][0])
    kept = []
    for p in candidates:
        if np.allclose(p.orientation, dominant, atol=ORIENTATION_TOLERANCE):
            kept.append(p)
        else:
            left_out.append(LeftOut(p.source, p.frame_number, OTHER_ORIENTATION))
    orientation = np.mean([p.orientation for p in kept], axis=0)
    normal = slice_normal(orientation)

    offsets = np.array([p.offset(normal) for p in kept])
    order = np.argsort(offsets, kind="stable")
    ordered: list[SliceGeometry] = []
    ordered_offsets: list[float] = []
    shared = 0
    for i in order:
        p, off = kept[i], float(offsets[i])
        # Compare with every kept slice at this position, not only the last one: A, B, A.
        same_place = []
        for q, o in zip(reversed(ordered), reversed(ordered_offsets), strict=True):
            if off - o >= POSITION_TOLERANCE_MM:
                break
            same_place.append(q)
        if any(q.image_key == p.image_key for q in same_place):
            left_out.append(LeftOut(p.source, p.frame_number, DUPLICATE))
            continue
        if same_place:
            shared += 1
        ordered.append(p)
        ordered_offsets.append(off)
    return SliceOrder(
        tuple(ordered), np.array(ordered_offsets), orientation, normal, tuple(left_out), shared
    )


@dataclass(frozen=True, eq=False)
class StackSpacing:
    """Spacing and tilt of a sorted stack of slice positions."""

    spacing: float
    """Median distance between adjacent slices along the normal, mm (for one slice: its
    thickness, else 1)."""
    gaps: np.ndarray
    """(K-1,) distances between adjacent slices along the normal, mm."""
    even: bool
    """All gaps within :data:`SPACING_RELATIVE_TOLERANCE` of the median."""
    tilt_degrees: float
    """Angle between the normal and the direction in which positions advance (gantry tilt)."""
    tilted: bool
    """Positions advance off the normal by more than the position tolerance."""
    mean_step: np.ndarray
    """(3,) mean step from one slice position to the next, mm (patient coordinates)."""


def evenly_spaced(gaps: np.ndarray, spacing: float) -> bool:
    """True when every gap is within :data:`SPACING_RELATIVE_TOLERANCE` of ``spacing``."""
    tolerance = SPACING_RELATIVE_TOLERANCE * spacing + POSITION_TOLERANCE_MM
    return gaps.size == 0 or bool(np.all(np.abs(gaps - spacing) <= tolerance))


def stack_spacing(
    positions: np.ndarray, normal: np.ndarray, thickness: float | None = None
) -> StackSpacing:
    """Spacing, evenness and gantry tilt of ``positions`` ((K, 3), sorted along ``normal``)."""
    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) < 2:
        spacing = float(thickness) if thickness else 1.0
        return StackSpacing(spacing, np.zeros(0), True, 0.0, False, normal * spacing)
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    spacing = float(np.median(along))
    inplane = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    tilt = float(np.degrees(np.arctan2(np.median(inplane), np.median(along))))
    tilted = bool(np.max(inplane) > max(POSITION_TOLERANCE_MM, 1e-3 * np.max(np.abs(along))))
    mean_step = (positions[-1] - positions[0]) / (len(positions) - 1)
    return StackSpacing(spacing, along, evenly_spaced(along, spacing), tilt, tilted, mean_step)
