"""Inputs for the result-encoding tests: volumes from real or generated CT, findings with known
geometry, and job contexts (shared by test_results_*.py and test_viewer.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.uids import input_set_hash
from workers.findings import LUNG, NODULE, CodedConcept, DetectionResult, Finding
from workers.models.base import ModelInfo
from workers.results import JobContext
from workers.volume import Volume

AI_FAMILY = CodedConcept("123110", "DCM", "Artificial Intelligence")
CONTENT_DATETIME = dt.datetime(2026, 11, 29, 10, 15, 30)


def model_info(version: str = "1.2.0", *, name: str = "lung-nodules", weights: str | None = None) -> ModelInfo:
    return ModelInfo(name=name, version=version, family=AI_FAMILY, description="Lung nodule detector", weights_sha256=weights)


def load_volume(paths: Sequence[Path]) -> Volume:
    """The series as a Volume, through the project's loader."""
    from workers.volume import load_series

    return load_series([str(p) for p in paths])


def voxel_centres_mm(volume: Volume) -> np.ndarray:
    """(K, J, I, 3) patient coordinates of every voxel centre, from each slice's own position
    (exact for tilted and unevenly spaced series)."""
    _, j, i = volume.shape
    row_dir = np.asarray(volume.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(volume.orientation[3:], dtype=np.float64)
    jj, ii = np.mgrid[0:j, 0:i]
    inplane = (ii[..., None] * volume.pixel_spacing[1] * row_dir) + (jj[..., None] * volume.pixel_spacing[0] * col_dir)
    return np.asarray(volume.positions, dtype=np.float64)[:, None, None, :] + inplane[None]


def sphere_finding(
    volume: Volume,
    center_ijk: tuple[int, int, int],
    radius_mm: float,
    *,
    confidence: float = 0.87,
    label: CodedConcept = NODULE,
    site: CodedConcept | None = LUNG,
    probability: bool = False,
) -> Finding:
    """A finding whose mask is a ball of ``radius_mm`` around the centre of voxel ``center_ijk``."""
    centres = voxel_centres_mm(volume)
    k, j, i = center_ijk
    c = centres[k, j, i]
    dist = np.linalg.norm(centres - c, axis=-1)
    mask = dist <= radius_mm
    areas = mask.sum(axis=(1, 2))
    key = int(np.argmax(areas))
    rows, cols = np.nonzero(mask[key])
    bbox = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))  # box edges
    prob = np.clip(1.0 - dist / (radius_mm * 1.5), 0.0, 1.0).astype(np.float32) if probability else None
    return Finding(
        label=label,
        site=site,
        confidence=confidence,
        center_ijk=(float(k), float(j), float(i)),
        center_mm=(float(c[0]), float(c[1]), float(c[2])),
        key_slice=key,
        bbox_2d=bbox,
        diameter_mm=round(2.0 * radius_mm, 2),
        volume_mm3=round(4.0 / 3.0 * np.pi * radius_mm**3, 1),
        mask=mask,
        probability=prob,
        kind="solid",
    )


def detection(volume: Volume, findings: list[Finding], model: ModelInfo | None = None) -> DetectionResult:
    model = model or model_info()
    return DetectionResult(
        model_name=model.name,
        model_version=model.version,
        series_instance_uid=volume.series_instance_uid,
        findings=findings,
    )


def job_for(volume: Volume, model: ModelInfo | None = None, **kw: object) -> JobContext:
    args: dict[str, object] = {
        "job_id": "job-1",
        "study_instance_uid": volume.study_instance_uid,
        "input_hash": input_set_hash(s.sop_instance_uid for s in volume.slices),
        "model": model or model_info(),
        "content_datetime": CONTENT_DATETIME,
        "node_name": "test-node",
        "ae_title": "AINODE",
    }
    args.update(kw)
    return JobContext(**args)  # type: ignore[arg-type]


def read(data: bytes) -> pydicom.Dataset:
    import io

    return pydicom.dcmread(io.BytesIO(data))
