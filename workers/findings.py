"""The result model: what a detector found. Models produce it; the SEG and SR encoders consume it.

Coordinates are given both in voxel indices of the :class:`~workers.volume.Volume` the model
saw (``k`` is the index of a *source slice*, so masks map one-to-one onto source instances) and
in patient space (mm, DICOM LPS), so encoders never redo geometry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CodedConcept:
    """A coded term (SNOMED CT by default), e.g. ``CodedConcept("27925004", "SCT", "Nodule")``."""

    value: str
    scheme: str
    meaning: str

    def to_json(self) -> dict[str, str]:
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


# Frequently used codes (SNOMED CT; DCM for DICOM-defined concepts).
NODULE = CodedConcept("27925004", "SCT", "Nodule")
MASS = CodedConcept("4147007", "SCT", "Mass")
LUNG = CodedConcept("39607008", "SCT", "Lung")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = CodedConcept(
    "49755003", "SCT", "Morphologically abnormal structure"
)


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement with UCUM units, e.g. long-axis diameter in ``mm``."""

    name: CodedConcept
    value: float
    unit: CodedConcept

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name.to_json(), "value": self.value, "unit": self.unit.to_json()}


LONG_AXIS = CodedConcept("103339001", "SCT", "Long Axis")
DIAMETER = CodedConcept("81827009", "SCT", "Diameter")
VOLUME = CodedConcept("118565006", "SCT", "Volume")
MM = CodedConcept("mm", "UCUM", "millimeter")
MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")


@dataclass
class Finding:
    """One detected object."""

    label: CodedConcept
    """Finding type, e.g. :data:`NODULE`."""
    site: CodedConcept | None
    """Finding site, e.g. :data:`LUNG`."""
    confidence: float
    """0..1, the model's calibrated score."""
    center_ijk: tuple[float, float, float]
    """Centre in volume indices (k = source slice index, j = row, i = column)."""
    center_mm: tuple[float, float, float]
    """Centre in patient coordinates (x, y, z) mm, LPS."""
    key_slice: int
    """Index of the source slice where the finding is best seen (for the 2D SR annotation)."""
    bbox_2d: tuple[float, float, float, float]
    """(col_min, row_min, col_max, row_max) box edges on the key slice in DICOM image coordinates:
    pixel (i, j) spans [i, i + 1) x [j, j + 1), so the box around pixels i0..i1 is (i0, .., i1 + 1, ..).
    The SR encoder writes it unchanged as the 2D SCOORD."""
    diameter_mm: float
    """Long-axis diameter in mm."""
    volume_mm3: float
    mask: np.ndarray | None = None
    """Boolean mask with the volume's shape (k, j, i), or None when the model gives no mask."""
    probability: np.ndarray | None = None
    """Optional float32 probability map (same shape) for FRACTIONAL SEG."""
    kind: str | None = None
    """Model-specific subtype, e.g. solid / part-solid / ground-glass."""
    category: CodedConcept | None = None
    """Segmented Property Category (CID 7150) of its SEG segment when the model says it (e.g.
    an organ from a segmentation bundle: Anatomical Structure); unset: derived from ``label``
    (:func:`workers.results.seg.category_for`)."""
    measurements: list[Measurement] = field(default_factory=list)
    """Further measurements beyond diameter and volume."""

    def summary(self) -> dict[str, Any]:
        """Patient-free JSON summary (for the job record and the dashboard)."""
        return {
            "label": self.label.meaning,
            "confidence": round(float(self.confidence), 4),
            "center_mm": [round(float(v), 2) for v in self.center_mm],
            "key_slice": int(self.key_slice),
            "bbox_2d": [round(float(v), 1) for v in self.bbox_2d],
            "diameter_mm": round(float(self.diameter_mm), 2),
            "volume_mm3": round(float(self.volume_mm3), 1),
            "kind": self.kind,
        }


@dataclass
class DetectionResult:
    """A model's complete output for one series."""

    model_name: str
    model_version: str
    series_instance_uid: str
    findings: list[Finding]
    runtime_seconds: float = 0.0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        return bool(self.findings)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "model_version": self.model_version,
            "finding_count": len(self.findings),
            "findings": [f.summary() for f in self.findings],
            "runtime_seconds": round(self.runtime_seconds, 3),
            "device": self.device,
            # A model that ran outside its validated input range says so next to its findings.
            **({"qualifier": str(self.extra["qualifier"])} if self.extra.get("qualifier") else {}),
        }
