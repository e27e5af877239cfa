"""Small generated DICOM studies for tests (no patient data; canary names on request)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CANARY_NAME = "PHICANARY^TEST"
CANARY_ID = "PHICANARY-ID-4711"


def ct_series(
    out_dir: Path,
    *,
    slices: int = 8,
    size: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = CANARY_NAME,
    patient_id: str = CANARY_ID,
    pixel_spacing: float = 0.8,
    slice_thickness: float = 2.0,
    description: str = "CHEST 2MM",
    modality: str = "CT",
    body_part: str = "CHEST",
    seed: int = 0,
    sop_uids: Sequence[str] | None = None,
) -> list[Path]:
    """Write an axial CT series (int16, rescale -1024) and return the file paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size * 0.42) ** 2
    paths = []
    now = datetime(2026, 11, 29, 9, 30, 0)
    for i in range(slices):
        hu = np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 10, (size, size)).astype(np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = sop_uids[i] if sop_uids else generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = now.strftime("%Y%m%d")
        ds.StudyTime = now.strftime("%H%M%S")
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = ds.StudyTime
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.AccessionNumber = "ACC0001"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = description
        ds.Modality = modality
        ds.BodyPartExamined = body_part
        ds.Manufacturer = "dicom-node tests"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-size * pixel_spacing / 2, -size * pixel_spacing / 2, -i * slice_thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = slice_thickness
        ds.SliceLocation = -i * slice_thickness
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        path = out_dir / f"ct_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
