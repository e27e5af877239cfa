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
* which images are slices and their order come from :func:`dicom_node.geometry.order_slices`
  (the rules the edge's job preview uses too): localizers / scouts, non-image objects, images
  without a readable plane and images of another orientation are left out (with a note);
* the voxel count is checked from the headers *before* any pixel data is decoded, so a
  "pixel bomb" is refused without allocating it; every file is opened through
  :mod:`dicom_node.dataset_io` (Deflated inflated as a capped stream); the pixel data is then
  decoded by :func:`workers.pixels.decode_frames`, within the decoded-bytes cap;
* gantry tilt and variable spacing are kept as they are (``uniform`` is False); detectors that
  need an even grid use :func:`workers.grid.uniform_grid`, which resamples along the normal and
  maps results back to source slice indices.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.dataset_io import DEFAULT_MAX_DECODED_BYTES, check_pixels, open_part10
from dicom_node.errors import IngestError, JobError
from dicom_node.geometry import order_slices, slice_normal, stack_spacing
from workers.pixels import PixelDataError, SourceInstance, decode_frames

DEFAULT_MAX_VOXELS = 1024 * 1024 * 1024
"""Refuse series with more voxels than this (4 GiB as float32) unless told otherwise."""


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
        return slice_normal(self.orientation)

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
            k = (
                (d - offsets[0]) / step
                if d < offsets[0]
                else len(offsets) - 1 + (d - offsets[-1]) / step
            )
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


def read_header(path: str | os.PathLike[str], *, limit: int = DEFAULT_MAX_DECODED_BYTES) -> Dataset:
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


# -- loading ------------------------------------------------------------------------------------


def _as_sources(
    items: Sequence[str | os.PathLike[str] | Dataset], limit: int = DEFAULT_MAX_DECODED_BYTES
) -> list[SourceInstance]:
    sources = []
    for item in items:
        if isinstance(item, Dataset):
            header = item
            filename = getattr(item, "filename", None)
            sources.append(
                SourceInstance(
                    header=header,
                    path=filename if isinstance(filename, str) else None,
                    dataset=item,
                )
            )
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
                raise VolumeError(
                    f"cannot read DICOM header of an input file ({type(exc).__name__})"
                ) from exc
            sources.append(SourceInstance(header=header, path=path, dataset=None))
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
    to load (otherwise more than one series is an error). Localizers, non-image objects,
    images without a readable plane and images of another orientation are left out
    (:func:`dicom_node.geometry.order_slices`) and listed in ``Volume.notes``. Raises
    :class:`VolumeError` with a reason (no patient data) when the series cannot be loaded: no
    images, mixed matrix sizes, two images at one position, more than ``max_voxels`` voxels
    (checked before decoding), undecodable pixel data, an instance that inflates or declares
    pixel data beyond ``max_decoded_bytes`` (``scp.max_decoded_bytes``) or whose frames exceed
    its fragments.
    """
    if not items:
        raise VolumeError("no images given")
    sources = _as_sources(items, max_decoded_bytes)
    groups = group_series(s.header for s in sources)
    if series_instance_uid is None:
        if len(groups) > 1:
            raise VolumeError(f"the images belong to {len(groups)} series; choose one")
        series_instance_uid = next(iter(groups))
    sources = [
        s for s in sources if str(s.header.get("SeriesInstanceUID", "")) == series_instance_uid
    ]
    if not sources:
        raise VolumeError("no images of the requested series")
    # Which images are slices, and their order along the normal: from the headers only, by
    # the rules the edge's preview uses too (dicom_node.geometry.order_slices).
    order = order_slices([s.header for s in sources])
    notes = order.notes()
    frames = list(order.slices)
    if not frames:
        raise VolumeError("the series has no cross-sectional images")
    if order.shared_positions:
        raise VolumeError(
            f"{order.shared_positions} pair(s) of images share a slice position (several "
            "acquisitions or phases in one series?)"
        )
    orientation, normal = order.orientation, order.normal

    # Matrix size, pixel spacing and the pixel-bomb check, before any pixel data is touched.
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) != 1:
        raise VolumeError(f"images of the series have {len(sizes)} different matrix sizes")
    rows, cols = sizes.pop()
    voxels = len(frames) * rows * cols
    if voxels > max_voxels:
        raise VolumeError(
            f"series too large: {len(frames)} x {rows} x {cols} = {voxels} voxels exceeds the "
            f"limit of {max_voxels}"
        )
    spacings = {tuple(np.round(f.pixel_spacing, 4)) for f in frames}
    if len(spacings) != 1:
        raise VolumeError("images of the series have different pixel spacings")
    pixel_spacing = frames[0].pixel_spacing

    # Spacing, tilt and the affine.
    positions = np.array([f.position for f in frames], dtype=np.float64)
    stack = stack_spacing(positions, normal, frames[0].thickness)
    if not stack.even:
        notes.append(
            f"slice spacing varies from {stack.gaps.min():.3g} to {stack.gaps.max():.3g} mm"
        )
    if stack.tilted:
        notes.append(f"slices are tilted by {stack.tilt_degrees:.1f} degrees (gantry tilt)")
    row_dir, col_dir = orientation[:3], orientation[3:]
    affine = np.eye(4)
    affine[:3, 0] = stack.mean_step
    affine[:3, 1] = col_dir * pixel_spacing[0]
    affine[:3, 2] = row_dir * pixel_spacing[1]
    affine[:3, 3] = positions[0]

    try:
        array = decode_frames(sources, frames, rows, cols, max_decoded_bytes)
    except PixelDataError as exc:
        raise VolumeError(str(exc)) from exc.__cause__
    # One header copy per instance, shared by its frames.
    copies = {f.source: _header_copy(sources[f.source].header) for f in frames}
    slices = [
        SourceSlice(
            sop_instance_uid=f.sop_instance_uid,
            sop_class_uid=str(sources[f.source].header.get("SOPClassUID", "")),
            frame_number=f.frame_number,
            path=sources[f.source].path,
        )
        for f in frames
    ]
    headers = [copies[f.source] for f in frames]
    first = sources[frames[0].source].header
    thicknesses = [f.thickness for f in frames if f.thickness]
    frame_of_reference = first.get("FrameOfReferenceUID")
    return Volume(
        array=array,
        slices=slices,
        positions=positions,
        orientation=orientation,
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
        slice_spacing=stack.spacing,
        affine=affine,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
        modality=str(first.get("Modality", "")),
        uniform=stack.even and not stack.tilted,
        headers=headers,
        slice_thickness=float(np.median(thicknesses)) if thicknesses else None,
        tilt_degrees=stack.tilt_degrees,
        notes=notes,
    )
