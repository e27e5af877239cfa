"""A synthetic chest CT for benchmarks: 512x512 int16 slices, Explicit VR Little Endian.

Written once to a cache folder and reused, so every benchmark run sends the same bytes. It is the
shape ``research/performance.md`` §1 measured (about 525 KB per file, 158 MB for 300 slices): a
body ellipse, two lungs, a spine and a few spherical nodules, plus noise. No patient data.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

PIXEL_MM = 0.7
SLICE_MM = 1.0


def _slice(z: int, size: int, rng: np.random.Generator, nodules: list[tuple[float, float, float, float]]) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2
    hu = np.full((size, size), -1000, np.float32)
    body = ((xx - c) / (size * 0.45)) ** 2 + ((yy - c) / (size * 0.33)) ** 2 < 1
    hu[body] = 40
    for side in (-1, 1):
        lung = ((xx - c - side * size * 0.19) / (size * 0.14)) ** 2 + ((yy - c + size * 0.02) / (size * 0.22)) ** 2 < 1
        hu[lung] = -850
    spine = (xx - c) ** 2 + (yy - c - size * 0.25) ** 2 < (size * 0.05) ** 2
    hu[spine] = 700
    for nz, ny, nx, r in nodules:
        dz = (z - nz) * SLICE_MM
        if abs(dz) < r:
            rr = np.sqrt(r * r - dz * dz) / PIXEL_MM
            hu[(xx - nx) ** 2 + (yy - ny) ** 2 < rr * rr] = 30
    hu += rng.normal(0, 15, (size, size)).astype(np.float32)
    return (np.clip(hu, -1024, 3071) + 1024).astype(np.int16)


def generate(out_dir: Path, *, slices: int = 300, size: int = 512, seed: int = 7) -> list[Path]:
    """Write the series to ``out_dir`` (once: reuses a complete earlier run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "series.json"
    if done.exists():
        info = json.loads(done.read_text())
        paths = [out_dir / name for name in info["files"]]
        if len(paths) == slices and all(p.exists() for p in paths):
            return paths
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    c = size / 2
    nodules = [
        (slices * 0.3, c - size * 0.05, c - size * 0.19, 12.0),
        (slices * 0.5, c + size * 0.05, c + size * 0.2, 6.0),
        (slices * 0.7, c, c - size * 0.15, 3.5),
    ]
    now = datetime(2026, 11, 29, 9, 0, 0)
    paths = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.PatientName = "BENCH^PHANTOM"
        ds.PatientID = "BENCH-0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "BENCH1"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = "CHEST 1MM"
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = "dicom-node benchmarks"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-c * PIXEL_MM, -c * PIXEL_MM, -i * SLICE_MM]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = SLICE_MM
        ds.SliceLocation = -i * SLICE_MM
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = _slice(i, size, rng, nodules).tobytes()
        path = out_dir / f"ct_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    done.write_text(json.dumps({"files": [p.name for p in paths], "study": "generated"}))
    return paths
