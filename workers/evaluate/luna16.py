"""LUNA16: MetaImage volumes (``.mhd`` header + ``.raw`` voxels) and the reference CSV files.

Layout as published (Setio et al., Medical Image Analysis 42:1-13, 2017): ``subset0..9/`` hold
``<seriesuid>.mhd`` and ``.raw``; ``annotations.csv`` lists the positives
(``seriesuid,coordX,coordY,coordZ,diameter_mm``: nodules >= 3 mm accepted by >= 3 of 4 LIDC
readers) and ``annotations_excluded.csv`` the marks to ignore (same columns; a diameter of -1
means unknown size, given the 5 mm ignore radius the LUNA16 script's 10 mm default implies).

Coordinates: the CSV coordinates are world coordinates of the MetaImage, i.e. ITK physical
space, which is DICOM patient LPS (the volumes were converted from the LIDC DICOM series with
ITK: ``Offset`` is the first slice's ImagePositionPatient). World point of voxel (i, j, k) =
``Offset + i*sx*d0 + j*sy*d1 + k*sz*d2``, where ``d0, d1, d2`` are the rows of
``TransformMatrix`` (the axis directions, as ITK's MetaImageIO reads them; identity in LUNA16)
and ``ElementSpacing = sx sy sz``. The ``.raw`` voxels run x fastest, so the array is (z, y, x):
exactly our :class:`~workers.volume.Volume` index order (k, j, i), with IOP = (d0, d1).
Read with numpy alone (no SimpleITK needed).
"""

from __future__ import annotations

import csv
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from workers.evaluate.references import Reference, SkipScan, ignore_region
from workers.volume import SourceSlice, Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ANNOTATIONS = "annotations.csv"
EXCLUDED = "annotations_excluded.csv"
ELEMENT_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}


def read_header(path: Path) -> dict[str, str]:
    """The ``key = value`` lines of a MetaImage header (up to ``ElementDataFile``)."""
    header: dict[str, str] = {}
    with open(path, "rb") as fh:
        for raw in fh:
            key, _, value = raw.decode("latin-1").partition("=")
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    return header


def _floats(header: dict[str, str], *keys: str, default: str) -> np.ndarray:
    for key in keys:
        if key in header:
            return np.array([float(v) for v in header[key].split()])
    return np.array([float(v) for v in default.split()])


def load_mhd(path: Path, *, max_voxels: int | None = None, uid: str | None = None) -> Volume:
    """A MetaImage volume as a :class:`Volume` in patient LPS (see the module docstring)."""
    h = read_header(path)
    dims = [int(v) for v in h["DimSize"].split()]
    if len(dims) != 3:
        raise SkipScan(f"a {len(dims)}-D MetaImage is not a CT volume")
    nx, ny, nz = dims
    if max_voxels is not None and nx * ny * nz > max_voxels:
        raise SkipScan(f"{nx * ny * nz} voxels are more than the model accepts ({max_voxels})")
    big_endian = h.get("ElementByteOrderMSB", h.get("BinaryDataByteOrderMSB", "False")) == "True"
    dtype = np.dtype(ELEMENT_TYPES[h["ElementType"]]).newbyteorder(">" if big_endian else "<")
    if h["ElementDataFile"] == "LOCAL":
        data = path.read_bytes()
        data = data[len(data) - nx * ny * nz * dtype.itemsize :]
    else:
        data = (path.parent / h["ElementDataFile"]).read_bytes()
    if h.get("CompressedData", "False") == "True":
        data = zlib.decompress(data)
    array = np.frombuffer(data, dtype=dtype, count=nx * ny * nz).reshape(nz, ny, nx)
    array = array.astype(np.float32)
    sx, sy, sz = _floats(h, "ElementSpacing", "ElementSize", default="1 1 1")
    origin = _floats(h, "Offset", "Origin", "Position", default="0 0 0")
    axes = _floats(h, "TransformMatrix", "Rotation", "Orientation", default="1 0 0 0 1 0 0 0 1")
    d0, d1, d2 = axes.reshape(3, 3)
    normal = np.cross(d0, d1)
    if float(d2 @ normal) < 0:
        # Slices stored against the normal: reverse them so k increases along it.
        array = array[::-1]
        origin = origin + (nz - 1) * sz * d2
        d2 = -d2
    positions = origin[None, :] + np.arange(nz)[:, None] * sz * d2[None, :]
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = sz * d2, sy * d1, sx * d0, origin
    tilt = float(np.degrees(np.arccos(np.clip(abs(d2 @ normal) / np.linalg.norm(normal), 0, 1))))
    series_uid = uid or path.stem
    from dicom_node.uids import derive_uid

    return Volume(
        array=np.ascontiguousarray(array),
        slices=[
            SourceSlice(derive_uid("luna16", series_uid, str(k)), CT_IMAGE_STORAGE, None, str(path))
            for k in range(nz)
        ],
        positions=positions,
        orientation=np.concatenate([d0, d1]),
        pixel_spacing=(float(sy), float(sx)),
        slice_spacing=float(sz),
        affine=affine,
        study_instance_uid="",
        series_instance_uid=series_uid,
        frame_of_reference_uid=None,
        modality="CT",
        uniform=tilt < 0.01,
        slice_thickness=float(sz),
        tilt_degrees=tilt,
        notes=["read from a MetaImage (.mhd); no DICOM headers"],
    )


def _rows(path: Path | None) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if path is None:
        return out
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            centre = [float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])]
            out.setdefault(row["seriesuid"].strip(), []).append(
                {"center_mm": centre, "diameter_mm": float(row["diameter_mm"])}
            )
    return out


def _loader(path: Path) -> Any:
    def load(requirements: Any) -> Volume:
        h = read_header(path)
        nz = int(h["DimSize"].split()[2])
        sz = float(_floats(h, "ElementSpacing", "ElementSize", default="1 1 1")[2])
        if nz < requirements.min_slices:
            raise SkipScan(f"{nz} slices, the model needs at least {requirements.min_slices}")
        limit = requirements.max_slice_thickness_mm
        if limit is not None and sz > limit + 1e-6:
            raise SkipScan(f"slice spacing {sz:g} mm is above the model's {limit:g} mm")
        return load_mhd(path, max_voxels=requirements.max_voxels)

    return load


def _first(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name))
    return found[0] if found else None


def is_luna16(folder: Path) -> bool:
    """Whether ``folder`` holds a LUNA16 ``annotations.csv`` (directly)."""
    return (folder / ANNOTATIONS).is_file()


def read_luna16(root: Path) -> list[Reference]:
    """One reference per ``.mhd`` volume under ``root`` (positives and ignore regions from the
    CSV files under ``root``; a volume the CSV does not list has no positives)."""
    positives = _rows(root / ANNOTATIONS)
    excluded = _rows(_first(root, EXCLUDED))
    refs = []
    for mhd in sorted(root.rglob("*.mhd")):
        uid = mhd.stem
        ignore = [
            ignore_region(
                e["center_mm"],
                e["diameter_mm"] if e["diameter_mm"] > 0 else None,
                "annotations_excluded.csv",
            )
            for e in excluded.get(uid, [])
        ]
        refs.append(Reference(uid, "luna16", positives.get(uid, []), ignore, _loader(mhd)))
    return refs
