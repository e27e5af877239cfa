"""A CT series as a volume, with the geometry the encoders need to map results back exactly.

Contract used across ``workers``:

* ``array[k]`` is the pixel data of source slice ``slices[k]`` (rescaled to HU, float32), so a
  mask with the array's shape maps one-to-one onto source instances (SEG frames, SR key slices).
* Slices are sorted by position along the slice normal (never by InstanceNumber).
* ``positions[k]`` is that slice's ImagePositionPatient; ``affine`` maps (k, j, i, 1) to patient
  (x, y, z, 1) in mm when the spacing is uniform; for gantry tilt or variable spacing the
  per-slice ``positions`` are authoritative.

:func:`load_series` builds a :class:`Volume` from files or datasets of one series:

* single-frame CT (any transfer syntax pydicom can decode with the installed plug-ins: JPEG
  lossless process 14 via GDCM, JPEG-LS, JPEG 2000, RLE, deflate) and multi-frame Enhanced /
  Legacy Converted Enhanced CT (per-frame functional groups);
* localizers / scouts and images of another orientation are left out (with a note);
* the voxel count is checked from the headers *before* any pixel data is decoded, so a
  "pixel bomb" is refused without allocating it; every file is opened through
  :mod:`dicom_node.dataset_io` (Deflated inflated as a capped stream; declared decoded size,
  NumberOfFrames against the fragments and each codestream's size checked before decoding);
* gantry tilt and variable spacing are kept as they are (``uniform`` is False); detectors that
  need an even grid use :func:`uniform_grid`, which resamples along the normal and maps results
  back to source slice indices.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.dataset_io import (
    DEFAULT_MAX_DECODED_BYTES,
    MAX_FRAMES,
    check_pixels,
    open_checked,
    open_part10,
)
from dicom_node.errors import IngestError, JobError

LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_VOXELS = 1024 * 1024 * 1024
"""Refuse series with more voxels than this (4 GiB as float32) unless told otherwise."""

LOCALIZER_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW"})
"""Values of ImageType / FrameType that mark a planning image rather than a slice."""

NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "REG", "DOC"})
"""Objects that can share a series with images but are not slices (left out by the loader)."""

_POSITION_TOLERANCE_MM = 1e-3
_SPACING_RELATIVE_TOLERANCE = 0.01


class VolumeError(JobError):
    """A series cannot be loaded as a volume; the message says why (no patient data)."""


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
    slice_thickness: float | None = None
    """Nominal SliceThickness (mm) of the source images, if given."""
    tilt_degrees: float = 0.0
    """Angle between the slice normal and the direction in which slice positions advance."""
    notes: list[str] = field(default_factory=list)
    """What the loader left out or noticed (localizers dropped, spacing varies...), no PHI."""

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape
        return int(k), int(j), int(i)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm."""
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row cosine x column cosine)."""
        return _normal(self.orientation)

    @property
    def slice_offsets(self) -> np.ndarray:
        """(K,) position of each slice along the normal, mm (increasing with k)."""
        return np.asarray(self.positions, dtype=np.float64) @ self.normal

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

    def patient_to_index(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """Inverse of :meth:`index_to_patient`: fractional (k, j, i) of a patient point.

        ``k`` is interpolated between the slices whose planes enclose the point (along the
        normal), so it is exact for tilted and unevenly spaced series too.
        """
        p = np.array([x, y, z], dtype=np.float64)
        offsets = self.slice_offsets
        d = float(p @ self.normal)
        k = float(np.interp(d, offsets, np.arange(len(offsets), dtype=np.float64)))
        if len(offsets) > 1 and (d < offsets[0] or d > offsets[-1]):
            # Extrapolate linearly outside the stack (np.interp would clamp).
            step = (offsets[-1] - offsets[0]) / (len(offsets) - 1)
            k = (d - offsets[0]) / step if d < offsets[0] else len(offsets) - 1 + (d - offsets[-1]) / step
        k0 = int(np.clip(np.floor(k), 0, len(self.positions) - 1))
        k1 = min(k0 + 1, len(self.positions) - 1)
        t = k - k0
        origin = (1 - t) * self.positions[k0] + t * self.positions[k1]
        rel = p - origin
        i = float(rel @ self.orientation[:3]) / self.pixel_spacing[1]
        j = float(rel @ self.orientation[3:]) / self.pixel_spacing[0]
        return k, j, i

    def voxel_centres(self, k: int) -> np.ndarray:
        """(rows, cols, 3) patient coordinates of every pixel centre of slice ``k``."""
        rows, cols = self.array.shape[1:]
        jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        return (
            self.positions[k][None, None, :]
            + ii[..., None] * self.pixel_spacing[1] * self.orientation[None, None, :3]
            + jj[..., None] * self.pixel_spacing[0] * self.orientation[None, None, 3:]
        )


# -- reading headers and grouping ---------------------------------------------------------------


def read_header(
    path: str | os.PathLike[str], *, limit: int = DEFAULT_MAX_DECODED_BYTES
) -> Dataset:
    """Read a DICOM file without its pixel data (cheap; used for grouping and selection).

    Bounded: a Deflated data set is inflated as a stream, never past ``limit`` bytes.
    """
    return open_part10(os.fspath(path), limit=limit).dataset


def group_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    """Group datasets by SeriesInstanceUID, keeping the order they came in.

    Datasets without a SeriesInstanceUID are grouped under ``""`` (they can never be chosen).
    """
    groups: dict[str, list[Dataset]] = {}
    for ds in datasets:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append(ds)
    return groups


def is_localizer(ds: Dataset) -> bool:
    """True for localizer / scout / topogram images (ImageType value 3 or any value)."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return any(v in LOCALIZER_TYPES for v in image_type)


def frame_count(ds: Dataset) -> int:
    """Number of frames of an instance (1 for single-frame)."""
    try:
        count = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1
    if count > MAX_FRAMES:
        raise VolumeError(f"NumberOfFrames above {MAX_FRAMES} is refused")
    return count


# -- per-frame geometry -------------------------------------------------------------------------


@dataclass
class _Frame:
    source: int
    """Index into the list of sources."""
    frame_number: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    thickness: float | None
    localizer: bool = False


def _first(seq: Any) -> Dataset | None:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _fg_value(ds: Dataset, per_frame: Dataset | None, sequence: str, attr: str) -> Any:
    """Look ``attr`` up in functional group ``sequence``: per-frame first, then shared."""
    for group in (per_frame, _first(ds.get("SharedFunctionalGroupsSequence"))):
        if group is None:
            continue
        item = _first(group.get(sequence))
        if item is not None and attr in item:
            return item.get(attr)
    return None


def _float_list(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{what} is malformed") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{what} must have {n} finite values")
    return arr


def _frames_of(ds: Dataset, source: int) -> list[_Frame]:
    """Geometry and rescale of every frame of ``ds`` (one entry for single-frame images)."""
    n = frame_count(ds)
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if n > 1 or per_frame_seq is not None:
        if per_frame_seq is None or len(per_frame_seq) != n:
            raise VolumeError("multi-frame instance without one PerFrameFunctionalGroupsSequence item per frame")
        frames = []
        localizer_instance = is_localizer(ds)
        for f in range(n):
            pf = per_frame_seq[f]
            ipp = _fg_value(ds, pf, "PlanePositionSequence", "ImagePositionPatient")
            iop = _fg_value(ds, pf, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _fg_value(ds, pf, "PixelMeasuresSequence", "PixelSpacing")
            if ipp is None or iop is None or spacing is None:
                raise VolumeError("multi-frame instance lacks plane position, orientation or pixel spacing")
            slope = _fg_value(ds, pf, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _fg_value(ds, pf, "PixelValueTransformationSequence", "RescaleIntercept")
            thickness = _fg_value(ds, pf, "PixelMeasuresSequence", "SliceThickness")
            frame_type = [str(v).upper() for v in (_fg_value(ds, pf, "CTImageFrameTypeSequence", "FrameType") or [])]
            sp = _float_list(spacing, 2, "PixelSpacing")
            frames.append(
                _Frame(
                    source=source,
                    frame_number=f + 1,
                    position=_float_list(ipp, 3, "ImagePositionPatient"),
                    orientation=_float_list(iop, 6, "ImageOrientationPatient"),
                    pixel_spacing=(float(sp[0]), float(sp[1])),
                    slope=float(slope) if slope is not None else 1.0,
                    intercept=float(intercept) if intercept is not None else 0.0,
                    thickness=float(thickness) if thickness not in (None, "") else None,
                    localizer=localizer_instance or any(v in LOCALIZER_TYPES for v in frame_type),
                )
            )
        return frames
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds or "PixelSpacing" not in ds:
        raise VolumeError("image without ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
    sp = _float_list(ds.PixelSpacing, 2, "PixelSpacing")
    thickness = ds.get("SliceThickness")
    return [
        _Frame(
            source=source,
            frame_number=None,
            position=_float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient"),
            orientation=_float_list(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),
            pixel_spacing=(float(sp[0]), float(sp[1])),
            slope=float(ds.get("RescaleSlope", 1) or 1),
            intercept=float(ds.get("RescaleIntercept", 0) or 0),
            thickness=float(thickness) if thickness not in (None, "") else None,
            localizer=is_localizer(ds),
        )
    ]


@dataclass(frozen=True)
class FrameGeometry:
    """Position, orientation, thickness of one frame, read from headers only."""

    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    thickness: float | None
    localizer: bool
    frame_number: int | None


def frame_geometry(ds: Dataset) -> list[FrameGeometry]:
    """Geometry of every frame of an instance (one entry for single-frame images).

    Raises :class:`VolumeError` when the instance lacks position, orientation or spacing.
    """
    return [
        FrameGeometry(f.position, f.orientation, f.pixel_spacing, f.thickness, f.localizer, f.frame_number)
        for f in _frames_of(ds, 0)
    ]


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64))
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise VolumeError("ImageOrientationPatient row and column directions are parallel")
    return n / norm


# -- loading ------------------------------------------------------------------------------------


@dataclass
class _Source:
    header: Dataset
    path: str | None
    dataset: Dataset | None
    """The full dataset when the caller passed Datasets (pixel data in memory)."""


def _as_sources(
    items: Sequence[str | os.PathLike[str] | Dataset], limit: int = DEFAULT_MAX_DECODED_BYTES
) -> list[_Source]:
    sources = []
    for item in items:
        if isinstance(item, Dataset):
            header = item
            filename = getattr(item, "filename", None)
            sources.append(_Source(header=header, path=filename if isinstance(filename, str) else None, dataset=item))
        else:
            path = os.fspath(item)
            try:
                # Sized now, before any geometry or decoding: a pixel bomb fails the job here.
                opened = open_part10(path, limit=limit)
                check_pixels(opened, path, limit)
                header = opened.dataset
            except IngestError as exc:
                raise VolumeError(f"an input file is refused: {exc}") from None
            except Exception as exc:
                raise VolumeError(f"cannot read DICOM header of an input file ({type(exc).__name__})") from exc
            sources.append(_Source(header=header, path=path, dataset=None))
    return sources


def _header_copy(ds: Dataset) -> Dataset:
    """A shallow copy without pixel data (for ``Volume.headers``)."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or elem.keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            continue
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def load_series(
    items: Sequence[str | os.PathLike[str] | Dataset],
    *,
    series_instance_uid: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Volume:
    """Load one series (file paths or pydicom Datasets) into a :class:`Volume` in HU.

    ``items`` may hold instances of several series; then ``series_instance_uid`` says which one
    to load (otherwise more than one series is an error). Localizers and images of a different
    orientation are left out and listed in ``Volume.notes``. Raises :class:`VolumeError` with a
    reason (no patient data) when the series cannot be loaded: no images, mixed matrix sizes,
    two images at one position, more than ``max_voxels`` voxels (checked before decoding),
    undecodable pixel data, an instance that inflates or declares pixel data beyond
    ``max_decoded_bytes`` (``scp.max_decoded_bytes``) or whose frames exceed its fragments.
    """
    if not items:
        raise VolumeError("no images given")
    sources = _as_sources(items, max_decoded_bytes)
    groups = group_series(s.header for s in sources)
    if series_instance_uid is None:
        if len(groups) > 1:
            raise VolumeError(f"the images belong to {len(groups)} series; choose one")
        series_instance_uid = next(iter(groups))
    sources = [s for s in sources if str(s.header.get("SeriesInstanceUID", "")) == series_instance_uid]
    if not sources:
        raise VolumeError("no images of the requested series")
    notes: list[str] = []

    # Geometry of every frame, from the headers only.
    frames: list[_Frame] = []
    skipped_no_geometry = 0
    for idx, src in enumerate(sources):
        if str(src.header.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            skipped_no_geometry += 1
            continue
        try:
            frames.extend(_frames_of(src.header, idx))
        except VolumeError:
            skipped_no_geometry += 1
    if skipped_no_geometry:
        notes.append(f"{skipped_no_geometry} instance(s) without usable image geometry left out")
    localizers = [f for f in frames if f.localizer]
    if localizers:
        notes.append(f"{len(localizers)} localizer/scout image(s) left out")
        frames = [f for f in frames if not f.localizer]
    if not frames:
        raise VolumeError("the series has no cross-sectional images")

    # Keep the dominant orientation (a stray reformat or scout in the series is left out).
    keyed = Counter(tuple(np.round(f.orientation, 3)) for f in frames)
    main_orientation = np.array(keyed.most_common(1)[0][0])
    same = [f for f in frames if np.allclose(f.orientation, main_orientation, atol=2e-3)]
    if len(same) != len(frames):
        notes.append(f"{len(frames) - len(same)} image(s) with another orientation left out")
    frames = same
    orientation = np.mean([f.orientation for f in frames], axis=0)
    normal = _normal(orientation)

    # Matrix size, pixel spacing and the pixel-bomb check, before any pixel data is touched.
    sizes = {(int(sources[f.source].header.get("Rows", 0) or 0), int(sources[f.source].header.get("Columns", 0) or 0)) for f in frames}
    if len(sizes) != 1:
        raise VolumeError(f"images of the series have {len(sizes)} different matrix sizes")
    rows, cols = sizes.pop()
    if rows <= 0 or cols <= 0:
        raise VolumeError("images without Rows/Columns")
    voxels = len(frames) * rows * cols
    if voxels > max_voxels:
        raise VolumeError(
            f"series too large: {len(frames)} x {rows} x {cols} = {voxels} voxels exceeds the limit of {max_voxels}"
        )
    spacings = {tuple(np.round(f.pixel_spacing, 4)) for f in frames}
    if len(spacings) != 1:
        raise VolumeError("images of the series have different pixel spacings")
    pixel_spacing = frames[0].pixel_spacing
    if min(pixel_spacing) <= 0:
        raise VolumeError("PixelSpacing must be positive")

    # Sort along the normal; never by InstanceNumber.
    offsets = np.array([f.position @ normal for f in frames])
    order = np.argsort(offsets, kind="stable")
    frames = [frames[i] for i in order]
    offsets = offsets[order]
    if len(frames) > 1:
        gaps = np.diff(offsets)
        dup = np.flatnonzero(gaps < _POSITION_TOLERANCE_MM)
        if dup.size:
            # The same instance sent twice is harmless; two different images at one place is not.
            same_instance = all(_same_image(sources, frames[i], frames[i + 1]) for i in dup)
            if not same_instance:
                raise VolumeError(
                    f"{dup.size} pair(s) of images share a slice position (several acquisitions "
                    "or phases in one series?)"
                )
            keep = np.ones(len(frames), dtype=bool)
            keep[dup + 1] = False
            frames = [f for f, k in zip(frames, keep, strict=True) if k]
            offsets = offsets[keep]
            notes.append(f"{dup.size} duplicate image(s) left out")
    positions = np.array([f.position for f in frames])

    # Spacing, tilt and the affine.
    uniform = True
    tilt = 0.0
    if len(frames) > 1:
        gaps = np.diff(offsets)
        slice_spacing = float(np.median(gaps))
        if np.max(np.abs(gaps - slice_spacing)) > _SPACING_RELATIVE_TOLERANCE * slice_spacing + 1e-3:
            uniform = False
            notes.append(f"slice spacing varies from {gaps.min():.3g} to {gaps.max():.3g} mm")
        steps = np.diff(positions, axis=0)
        along = steps @ normal
        inplane = np.linalg.norm(steps - np.outer(along, normal), axis=1)
        tilt = float(np.degrees(np.arctan2(np.median(inplane), np.median(along))))
        if np.max(inplane) > max(_POSITION_TOLERANCE_MM, 1e-3 * np.max(np.abs(along))):
            uniform = False
            notes.append(f"slices are tilted by {tilt:.1f} degrees (gantry tilt)")
        mean_step = (positions[-1] - positions[0]) / (len(frames) - 1)
    else:
        thickness = frames[0].thickness
        slice_spacing = float(thickness) if thickness else 1.0
        mean_step = normal * slice_spacing
    row_dir, col_dir = orientation[:3], orientation[3:]
    affine = np.eye(4)
    affine[:3, 0] = mean_step
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = row_dir * pixel_spacing[1]
    affine[:3, 3] = positions[0]

    array, slices, headers = _read_pixels(sources, frames, rows, cols, max_decoded_bytes)
    first = sources[frames[0].source].header
    thicknesses = [f.thickness for f in frames if f.thickness]
    return Volume(
        array=array,
        slices=slices,
        positions=positions,
        orientation=orientation,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        slice_spacing=slice_spacing,
        affine=affine,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID")) if first.get("FrameOfReferenceUID") else None,
        modality=str(first.get("Modality", "")),
        uniform=uniform,
        headers=headers,
        slice_thickness=float(np.median(thicknesses)) if thicknesses else None,
        tilt_degrees=tilt,
        notes=notes,
    )


def _same_image(sources: list[_Source], a: _Frame, b: _Frame) -> bool:
    ha, hb = sources[a.source].header, sources[b.source].header
    return ha.get("SOPInstanceUID") == hb.get("SOPInstanceUID") and a.frame_number == b.frame_number


def _read_pixels(
    sources: list[_Source], frames: list[_Frame], rows: int, cols: int, limit: int
) -> tuple[np.ndarray, list[SourceSlice], list[Dataset]]:
    """Decode each needed instance once, rescale to HU into a preallocated float32 array.

    Instances are decoded one at a time and dropped right away, so the peak stays close to the
    size of the float32 volume (a 300-slice CT: about 1.1x instead of 2.2x).
    """
    array = np.empty((len(frames), rows, cols), dtype=np.float32)
    by_source: dict[int, list[tuple[int, _Frame]]] = {}
    for k, f in enumerate(frames):
        by_source.setdefault(f.source, []).append((k, f))
    slices: list[SourceSlice | None] = [None] * len(frames)
    headers: list[Dataset | None] = [None] * len(frames)
    for src_index, entries in by_source.items():
        src = sources[src_index]
        header = _header_copy(src.header)
        pixels = _decode(src, limit)
        multi = entries[0][1].frame_number is not None
        if multi and pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.shape[-2:] != (rows, cols):
            raise VolumeError("decoded pixel data does not match Rows/Columns")
        for k, f in entries:
            if multi:
                assert f.frame_number is not None  # _frames_of numbers every frame of a multi-frame instance
                frame = pixels[f.frame_number - 1]
            else:
                frame = pixels
            if frame.ndim != 2:
                raise VolumeError("only single-sample (greyscale) images can be loaded")
            np.multiply(frame, f.slope, out=array[k], casting="unsafe")
            array[k] += np.float32(f.intercept)
            slices[k] = SourceSlice(
                sop_instance_uid=str(src.header.get("SOPInstanceUID", "")),
                sop_class_uid=str(src.header.get("SOPClassUID", "")),
                frame_number=f.frame_number,
                path=src.path,
            )
            headers[k] = header
        del pixels
    return array, [s for s in slices if s is not None], [h for h in headers if h is not None]


def _decode(src: _Source, limit: int) -> np.ndarray:
    """Pixel data of one instance as stored values (before rescale).

    A file is opened with :func:`dicom_node.dataset_io.open_checked`: a pixel bomb (declared
    size over ``limit``, frames beyond the fragments, a codestream larger than Rows x Columns)
    fails the job with a reason before a decoder allocates anything.
    """
    try:
        if src.dataset is not None and "PixelData" in src.dataset:
            return src.dataset.pixel_array
        if src.path is None:
            raise VolumeError("a dataset without pixel data was given")
        ds = open_checked(src.path, limit=limit)
        if "PixelData" not in ds:
            raise VolumeError("an image instance has no pixel data")
        return ds.pixel_array
    except VolumeError:
        raise
    except IngestError as exc:
        raise VolumeError(f"pixel data refused before decoding: {exc}") from None
    except Exception as exc:
        ts = ""
        meta = getattr(src.header, "file_meta", None)
        if meta is not None and "TransferSyntaxUID" in meta:
            ts = f" (transfer syntax {meta.TransferSyntaxUID.name})"
        raise VolumeError(f"cannot decode pixel data{ts}: {type(exc).__name__}") from exc


# -- resampling for detectors that need an even grid --------------------------------------------


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
        return np.interp(off, self.source_offsets, np.arange(len(self.source_offsets), dtype=np.float64))

    def to_grid_index(self, k: float | np.ndarray) -> float | np.ndarray:
        """Fractional grid index of source slice index ``k``."""
        if self.identity:
            return k
        off = np.interp(k, np.arange(len(self.source_offsets)), self.source_offsets)
        return (off - self.offsets[0]) / self.spacing

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """Map a grid mask to source slices: each source slice takes the nearest grid slice."""
        if self.identity:
            return mask
        idx = np.rint((self.source_offsets - self.offsets[0]) / self.spacing).astype(int)
        idx = np.clip(idx, 0, mask.shape[0] - 1)
        return mask[idx]


def uniform_grid(volume: Volume, spacing: float | None = None, *, max_gap_mm: float | None = None) -> UniformGrid:
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
            f"gap of {gaps.max():.2f} mm between adjacent slices exceeds {max_gap_mm:.2f} mm (missing images?)"
        )
    spacing = float(spacing or volume.slice_spacing)
    evenly = gaps.size == 0 or bool(np.all(np.abs(gaps - spacing) <= _SPACING_RELATIVE_TOLERANCE * spacing + 1e-3))
    if evenly:
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


def load_paths(paths: Iterable[str | os.PathLike[str]]) -> dict[str, list[Path]]:
    """Group files by series from their headers; unreadable files are skipped (logged by count)."""
    groups: dict[str, list[Path]] = {}
    bad = 0
    for p in paths:
        try:
            ds = read_header(p)
        except Exception:
            bad += 1
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(Path(p))
    if bad:
        LOGGER.warning("%d file(s) are not readable DICOM and were skipped", bad)
    return groups
