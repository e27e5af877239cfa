"""The plane of one image or frame: where it lies in the patient, read from its headers only.

A single-frame image carries its plane at the top level (Image Plane module, PS3.3 C.7.6.2); an
enhanced or legacy-converted multi-frame instance carries one plane per frame in its functional
groups (PS3.3 C.7.6.16: Per-frame first, then Shared). :func:`slice_geometry` reads either into
:class:`SliceGeometry` records, and refuses malformed values with :class:`GeometryError` instead
of guessing a position (a guessed position would put the image at the wrong index).

Which images are slices at all is decided here too: :func:`is_non_image` (SR, SEG, presentation
states... that share a series with images) and :func:`is_localizer` (planning images, by
ImageType or per-frame FrameType).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.dataset_io import frame_count
from dicom_node.errors import IngestError
from dicom_node.geometry.errors import GeometryError
from dicom_node.geometry.functional_groups import functional_group_value, header_value

LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW"})
"""Values of ImageType / FrameType (any value) that mark a planning image rather than a slice."""

NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "REG", "DOC"})
"""Modalities of objects that can share a series with images but are not slices."""

NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # segmentation, registration, surface...
    "1.2.840.10008.5.1.4.1.1.88",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.481",  # RT objects
)
"""SOP Class UID roots (PS3.4 Annex B) of objects that are never slices, whatever their Modality."""

UNIT_TOLERANCE = 1e-2
"""How far the IOP direction cosines may be from unit length and orthogonality (real headers
round them to a few decimals; anything further off is not a plane)."""


@dataclass(frozen=True)
class SliceGeometry:
    """The plane of one single-frame image or one frame of a multi-frame instance."""

    source: int
    """Index of the instance in the caller's list."""
    frame_number: int | None
    """1-based frame number for multi-frame (enhanced) instances, None for single-frame."""
    sop_instance_uid: str
    position: tuple[float, float, float]
    """ImagePositionPatient: centre of the first transmitted pixel, mm."""
    orientation: tuple[float, float, float, float, float, float]
    """ImageOrientationPatient: row direction cosines, then column direction cosines."""
    pixel_spacing: tuple[float, float]
    """(row spacing, column spacing) mm: PixelSpacing as stored."""
    rows: int
    columns: int
    thickness: float | None
    """SliceThickness (mm) when given."""
    localizer: bool
    """A planning image (ImageType or FrameType names one of :data:`LOCALIZER_TYPES`)."""

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of this plane (row cosine x column cosine)."""
        return slice_normal(self.orientation)

    def offset(self, normal: np.ndarray) -> float:
        """Position of the plane along ``normal`` (mm)."""
        return float(np.asarray(self.position, dtype=np.float64) @ normal)

    @property
    def image_key(self) -> tuple[str, int | None]:
        """(SOPInstanceUID, frame): the same key twice means the same image sent twice."""
        return (self.sop_instance_uid, self.frame_number)


def _values(value: Any) -> list[Any]:
    """A multi-valued element as a list (pydicom returns a bare value for VM 1)."""
    if value is None:
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def read_floats(value: Any, count: int, keyword: str) -> tuple[float, ...]:
    """``count`` finite numbers from a DS/FD element value, or :class:`GeometryError`."""
    try:
        numbers = tuple(float(v) for v in _values(value))
    except (TypeError, ValueError):
        raise GeometryError(f"{keyword} is malformed") from None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise GeometryError(f"{keyword} must have {count} finite values")
    return numbers


def read_position(value: Any) -> tuple[float, float, float]:
    """ImagePositionPatient as three finite floats."""
    x, y, z = read_floats(value, 3, "ImagePositionPatient")
    return (x, y, z)


def read_orientation(value: Any) -> tuple[float, float, float, float, float, float]:
    """ImageOrientationPatient as six floats: two unit, orthogonal direction cosines."""
    v = read_floats(value, 6, "ImageOrientationPatient")
    row, col = np.array(v[:3]), np.array(v[3:])
    if (
        abs(float(np.linalg.norm(row)) - 1) > UNIT_TOLERANCE
        or abs(float(np.linalg.norm(col)) - 1) > UNIT_TOLERANCE
        or abs(float(row @ col)) > UNIT_TOLERANCE
    ):
        raise GeometryError("ImageOrientationPatient is not two orthogonal unit vectors")
    return (v[0], v[1], v[2], v[3], v[4], v[5])


def read_pixel_spacing(value: Any) -> tuple[float, float]:
    """PixelSpacing as two positive floats (row spacing, column spacing)."""
    dr, dc = read_floats(value, 2, "PixelSpacing")
    if dr <= 0 or dc <= 0:
        raise GeometryError("PixelSpacing must be positive")
    return (dr, dc)


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal (row cosine x column cosine) of an ImageOrientationPatient."""
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:6])
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise GeometryError("ImageOrientationPatient row and column directions are parallel")
    return n / norm


_PATIENT_AXES = (("L", "R"), ("P", "A"), ("H", "F"))
"""Letters of the LPS axes (positive, negative), PS3.3 C.7.6.1.1.1."""


def patient_orientation(orientation: Sequence[float] | np.ndarray) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of an image with ImageOrientationPatient ``orientation``:
    the direction of the rows, then of the columns, each as up to three letters in order of
    importance, leaving out axes the direction barely moves along (PS3.3 C.7.6.1.1.1).

    >>> patient_orientation([1, 0, 0, 0, 1, 0])
    ('L', 'P')
    """
    o = np.asarray(orientation, dtype=np.float64)

    def letters(direction: np.ndarray) -> str:
        order = np.argsort(-np.abs(direction), kind="stable")
        return "".join(
            _PATIENT_AXES[axis][0 if direction[axis] > 0 else 1]
            for axis in order
            if abs(direction[axis]) > 1e-3
        )

    return letters(o[:3]), letters(o[3:6])


def is_non_image(ds: Dataset) -> bool:
    """True for objects that are not slices: by Modality, SOP Class, or no Rows/Columns."""
    if str(header_value(ds, "Modality", "") or "").upper() in NON_IMAGE_MODALITIES:
        return True
    sop_class = str(header_value(ds, "SOPClassUID", "") or "")
    if any(sop_class.startswith(p) for p in NON_IMAGE_SOP_CLASS_PREFIXES):
        return True
    return "Rows" not in ds or "Columns" not in ds


def _names_localizer(value: Any) -> bool:
    return any(str(v).strip().upper() in LOCALIZER_TYPES for v in _values(value))


def is_localizer(ds: Dataset, frame_index: int | None = None) -> bool:
    """True for a planning image: ImageType (any value, VM 1 too) or, for a frame of an enhanced
    CT/MR instance, its FrameType names a localizer / scout / topogram."""
    if _names_localizer(header_value(ds, "ImageType")):
        return True
    if frame_index is None:
        return False
    return any(
        _names_localizer(functional_group_value(ds, frame_index, seq, "FrameType"))
        for seq in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence")
    )


def _thickness(value: Any) -> float | None:
    try:
        t = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None  # SliceThickness is informative only; a bad one is treated as absent
    return t if t is not None and math.isfinite(t) and t > 0 else None


def _matrix(ds: Dataset) -> tuple[int, int]:
    try:
        rows = int(header_value(ds, "Rows", 0) or 0)
        columns = int(header_value(ds, "Columns", 0) or 0)
    except (TypeError, ValueError):
        raise GeometryError("Rows/Columns are malformed") from None
    if rows <= 0 or columns <= 0:
        raise GeometryError("image without Rows/Columns")
    return rows, columns


def slice_geometry(ds: Dataset, source: int = 0) -> list[SliceGeometry]:
    """The plane of every frame of ``ds`` (one entry for a single-frame image).

    Single-frame images need ImagePositionPatient, ImageOrientationPatient and PixelSpacing at
    the top level. Multi-frame instances, and single-frame ones with functional groups, need
    one Per-frame Functional Groups item per frame and, per frame or shared, Plane Position,
    Plane Orientation and Pixel Measures. Raises :class:`GeometryError` otherwise, and for
    malformed values (wrong count, not numbers, non-orthonormal orientation).
    """
    try:
        count = frame_count(ds)
    except IngestError as exc:
        raise GeometryError(str(exc)) from None
    rows, columns = _matrix(ds)
    uid = str(header_value(ds, "SOPInstanceUID", "") or "")
    per_frame = header_value(ds, "PerFrameFunctionalGroupsSequence")
    if count == 1 and per_frame is None:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise GeometryError(f"image without {keyword}")
        return [
            SliceGeometry(
                source=source,
                frame_number=None,
                sop_instance_uid=uid,
                position=read_position(header_value(ds, "ImagePositionPatient")),
                orientation=read_orientation(header_value(ds, "ImageOrientationPatient")),
                pixel_spacing=read_pixel_spacing(header_value(ds, "PixelSpacing")),
                rows=rows,
                columns=columns,
                thickness=_thickness(header_value(ds, "SliceThickness")),
                localizer=is_localizer(ds),
            )
        ]
    if per_frame is None or len(per_frame) != count:
        raise GeometryError("multi-frame instance without one per-frame functional group per frame")
    frames = []
    for f in range(count):
        position = functional_group_value(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        orientation = functional_group_value(
            ds, f, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = functional_group_value(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise GeometryError(
                "multi-frame instance lacks plane position, orientation or pixel spacing"
            )
        frames.append(
            SliceGeometry(
                source=source,
                frame_number=f + 1,
                sop_instance_uid=uid,
                position=read_position(position),
                orientation=read_orientation(orientation),
                pixel_spacing=read_pixel_spacing(spacing),
                rows=rows,
                columns=columns,
                thickness=_thickness(
                    functional_group_value(ds, f, "PixelMeasuresSequence", "SliceThickness")
                ),
                localizer=is_localizer(ds, f),
            )
        )
    return frames
