"""Encoded result objects: the exact bytes that are stored, checked and sent.

An :class:`EncodedObject` is made once from a highdicom dataset and from then on is only bytes
(plus the parsed dataset for convenience). The conformance gate checks those bytes, they are
written to the job's result folder before any delivery, and every (re)send reads them back from
there, so a resend is byte-identical to the first send.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.results_store import write_atomically
from workers.results.identity import (
    KIND_GSPS,
    KIND_KEY_IMAGES,
    KIND_KOS,
    KIND_SC,
    KIND_SEG,
    KIND_SR,
    KIND_SR_VOLUMETRIC,
    OUTPUT_KINDS,
)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION_STORAGE = "1.2.840.10008.5.1.4.1.1.88.59"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
SOP_CLASS_BY_KIND = {
    KIND_SR: COMPREHENSIVE_3D_SR_STORAGE,
    KIND_SEG: SEGMENTATION_STORAGE,
    KIND_SR_VOLUMETRIC: COMPREHENSIVE_3D_SR_STORAGE,
    KIND_KOS: KEY_OBJECT_SELECTION_STORAGE,
    KIND_SC: SECONDARY_CAPTURE_IMAGE_STORAGE,
    KIND_GSPS: GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    KIND_KEY_IMAGES: KEY_OBJECT_SELECTION_STORAGE,
}
MAX_INSTANCES_PER_KIND = 99
"""Bound on the instances of one kind a result folder holds (``sc``: one per finding, capped)."""


@dataclass(frozen=True)
class EncodedObject:
    """One output object (Part 10 bytes) and what the pipeline needs to know about it."""

    kind: str
    """``"sr"`` (viewer SR), ``"seg"``, ``"sr-volumetric"``, ``"kos"`` (rejection note),
    ``"sc"``, ``"gsps"`` or ``"key-images"``."""
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    data: bytes = field(repr=False)
    """The DICOM Part 10 file, exactly as stored and sent."""
    dataset: Dataset = field(repr=False, compare=False)
    """``data`` parsed (do not modify: it would no longer match ``data``)."""
    number: int = 1
    """Which instance of its kind (1-based): several only for ``sc``, one image per finding."""

    @property
    def filename(self) -> str:
        """File name in the job's result folder (from the kind and number, never from a UID):
        ``sc.dcm`` for the first instance of a kind, ``sc-2.dcm`` for the second..."""
        return f"{self.kind}.dcm" if self.number == 1 else f"{self.kind}-{self.number}.dcm"

    @classmethod
    def from_dataset(cls, kind: str, ds: Dataset, number: int = 1) -> EncodedObject:
        """Serialise ``ds`` (Part 10, its own transfer syntax) and parse the bytes back."""
        if kind not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {kind!r}")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return cls.from_bytes(kind, buf.getvalue(), number)

    @classmethod
    def from_bytes(cls, kind: str, data: bytes, number: int = 1) -> EncodedObject:
        """Parse stored Part 10 bytes (raises pydicom's errors when unreadable)."""
        if not 1 <= number <= MAX_INSTANCES_PER_KIND:
            raise ValueError(f"instance number must be 1..{MAX_INSTANCES_PER_KIND}, got {number}")
        ds = pydicom.dcmread(io.BytesIO(data))
        return cls(
            kind=kind,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            data=data,
            dataset=ds,
            number=number,
        )


def write_results(objects: list[EncodedObject], out_dir: Path) -> list[Path]:
    """Write each object to ``out_dir/<kind>.dcm`` atomically
    (:func:`dicom_node.results_store.write_atomically`), for callers outside a job (tests,
    tools); the pipeline puts results in the result store (:mod:`workers.storage`).

    Returns the paths in the order of ``objects``. Rewriting the same objects is harmless.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [o.filename for o in objects]
    if len(set(names)) != len(names):
        raise ValueError("two objects of the same kind and number cannot be written to one folder")
    paths = []
    for obj in objects:
        target = out_dir / obj.filename
        write_atomically(target, [obj.data], max_bytes=len(obj.data))
        paths.append(target)
    return paths


def load_results(out_dir: Path) -> list[EncodedObject]:
    """Read back what :func:`write_results` stored, kind by kind (:data:`OUTPUT_KINDS` order),
    each kind's instances in number order."""
    out_dir = Path(out_dir)
    found = []
    for kind in OUTPUT_KINDS:
        for number in range(1, MAX_INSTANCES_PER_KIND + 1):
            path = out_dir / (f"{kind}.dcm" if number == 1 else f"{kind}-{number}.dcm")
            if not path.is_file():
                break
            found.append(EncodedObject.from_bytes(kind, path.read_bytes(), number))
    return found
