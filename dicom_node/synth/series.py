"""Writing a phantom as a DICOM CT series (one file per slice) plus its ground-truth JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from dicom_node.synth.phantom import Phantom, Progress
from dicom_node.uids import derive_uid

TRUTH_FILE = "truth.json"
ACQUISITION = datetime(2026, 1, 15, 9, 30, 0)
"""A fixed, synthetic acquisition date/time (reproducible output)."""


@dataclass
class SeriesFiles:
    """What :func:`write_series` wrote."""

    folder: Path
    paths: list[Path]
    truth_path: Path
    study_instance_uid: str
    series_instance_uid: str


def _uids(phantom: Phantom) -> tuple[str, str, str]:
    key = (str(phantom.spec.seed), phantom.spec.digest())
    return (
        derive_uid("synth", *key, "study"),
        derive_uid("synth", *key, "series"),
        derive_uid("synth", *key, "frame-of-reference"),
    )


def write_series(phantom: Phantom, folder: Path, *, progress: Progress | None = None) -> SeriesFiles:
    """Write ``phantom`` into ``folder`` as ``slice_0001.dcm``... (CT Image Storage, Explicit VR
    Little Endian, 16-bit signed, rescale intercept -1024) and ``truth.json``.

    UIDs are derived from the seed and the spec, so the same phantom always gets the same UIDs
    (file names never contain UIDs). The slice order in the files is head first
    (InstanceNumber 1 is the most superior slice), as scanners usually write it.
    """
    report = progress or (lambda stage, fraction: None)
    folder.mkdir(parents=True, exist_ok=True)
    spec = phantom.spec
    study_uid, series_uid, frame_uid = _uids(phantom)
    date = ACQUISITION.strftime("%Y%m%d")
    time_ = ACQUISITION.strftime("%H%M%S")
    paths: list[Path] = []
    k_count = phantom.hu.shape[0]
    for k in range(k_count):
        sop_uid = derive_uid("synth", str(spec.seed), spec.digest(), "image", str(k))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time_
        ds.AccessionNumber = f"SYN{spec.seed}"
        ds.Modality = "CT"
        ds.Manufacturer = "dicom-node synth"
        ds.ManufacturerModelName = "chest phantom"
        ds.InstitutionName = "Synthetic"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "SYNTHETIC CT CHEST"
        ds.SeriesDescription = f"SYNTH CHEST {spec.slice_thickness:g}MM LUNG"
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id or f"SYNTH-{spec.seed}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = spec.slice_thickness
        ds.KVP = 120
        ds.ConvolutionKernel = "LUNG"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(v, 4) for v in phantom.position(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(phantom.position(k)[2], 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.matrix
        ds.Columns = spec.matrix
        ds.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = (phantom.hu[k].astype(np.int16) + np.int16(1024)).tobytes()
        path = folder / f"slice_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        if k % 16 == 0:
            report("write", k / k_count)
    truth = phantom.truth()
    truth["study_instance_uid"] = study_uid
    truth["series_instance_uid"] = series_uid
    truth["frame_of_reference_uid"] = frame_uid
    truth_path = folder / TRUTH_FILE
    truth_path.write_text(json.dumps(truth, indent=2) + "\n")
    report("write", 1.0)
    return SeriesFiles(folder, paths, truth_path, study_uid, series_uid)
