"""DICOM Segmentation (highdicom) from a detection result.

* BINARY by default; FRACTIONAL (PROBABILITY, 0..255) from ``Finding.probability`` on request
  (OHIF 3.13 does not display FRACTIONAL SEG, so it is opt-in).
* One segment per finding that has a non-empty mask (or probability map), numbered 1..n in
  finding order, labelled ``"<finding type> <n>"``, with SNOMED category/type from the finding
  label, the finding site as anatomic region, algorithm type AUTOMATIC and the algorithm's
  identification (name, version, family). Each segment carries the finding's Tracking UID,
  the same one the SR measurement group uses.
* Source images are the volume's source instances (``volume.headers``, aligned with
  ``volume.slices``): mask index ``k`` is source image ``k``. highdicom takes each frame's
  position from its own source image, so gantry tilt and uneven spacing come out right.
  Empty frames are omitted.

**Empty results.** When no finding has a mask with at least one voxel set, no SEG is made
(:func:`build_segmentation` returns ``None``) and the SR alone reports the result; a SEG must
contain at least one segment, and an empty overlay would tell the radiologist nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np

from dicom_node.errors import JobError
from dicom_node.uids import derive_uid
from workers.findings import (
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    CodedConcept,
    DetectionResult,
    Finding,
)
from workers.results.identity import (
    JobContext,
    OutputIdentity,
    contributing_equipment,
    display_version,
    stamp_dates,
    tracking_uid,
)
from workers.results.sources import SourceImages, source_images
from workers.volume import Volume

BINARY = "BINARY"
FRACTIONAL = "FRACTIONAL"
SEGMENTATION_TYPES = (BINARY, FRACTIONAL)

ANATOMICAL_STRUCTURE = CodedConcept("91723000", "SCT", "Anatomical Structure")
TISSUE = CodedConcept("85756007", "SCT", "Tissue")

# Segmented Property Category (CID 7150) for finding types we know; anything else is treated
# as a lesion-like finding ("Morphologically abnormal structure"), which is what detectors emit.
_CATEGORY_BY_TYPE: dict[tuple[str, str], CodedConcept] = {
    ("SCT", "39607008"): ANATOMICAL_STRUCTURE,  # Lung
    ("SCT", "10200004"): ANATOMICAL_STRUCTURE,  # Liver
    ("SCT", "64033007"): ANATOMICAL_STRUCTURE,  # Kidney
    ("SCT", "12738006"): ANATOMICAL_STRUCTURE,  # Brain
    ("SCT", "80891009"): ANATOMICAL_STRUCTURE,  # Heart
    ("SCT", "248300009"): TISSUE,  # Fat
}

# Distinct display colours (RGB) so several findings are told apart in a viewer; the first is a
# saturated red that stands out on greyscale CT.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)


def category_for(label: CodedConcept) -> CodedConcept:
    """Segmented Property Category for a finding type (CID 7150)."""
    return _CATEGORY_BY_TYPE.get((label.scheme, label.value), MORPHOLOGICALLY_ABNORMAL_STRUCTURE)


def coded(concept: CodedConcept) -> hd.sr.CodedConcept:
    """Our :class:`~workers.findings.CodedConcept` as highdicom's."""
    return hd.sr.CodedConcept(value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning)


def algorithm_identification(job: JobContext) -> hd.AlgorithmIdentificationSequence:
    """Segment Algorithm Identification: name, version, family, and the weights hash if known."""
    params = {"weights_sha256": job.model.weights_sha256} if job.model.weights_sha256 else None
    return hd.AlgorithmIdentificationSequence(
        name=job.model.name[:64],
        family=coded(job.model.family),
        version=job.model.version[:64],
        source=job.model.manufacturer[:64],
        parameters=params,
    )


def finding_identifier(finding: Finding, number: int) -> str:
    """Human-readable tracking identifier / segment label, e.g. ``Nodule 2``."""
    return f"{finding.label.meaning} {number}"[:64]


@dataclass(frozen=True)
class SegmentRef:
    """Which finding became which segment."""

    finding_index: int
    """0-based index into ``DetectionResult.findings``."""
    segment_number: int
    tracking_uid: str


def _finding_array(finding: Finding, segmentation_type: str) -> np.ndarray | None:
    if segmentation_type == FRACTIONAL and finding.probability is not None:
        arr = np.clip(np.asarray(finding.probability, dtype=np.float32), 0.0, 1.0)
        return arr if float(arr.max(initial=0.0)) > 0.0 else None
    if finding.mask is None:
        return None
    mask = np.asarray(finding.mask).astype(bool, copy=False)
    if not mask.any():
        return None
    return mask.astype(np.float32) if segmentation_type == FRACTIONAL else mask


def _frames_for_sources(stacked: np.ndarray, sources: SourceImages) -> np.ndarray:
    """(slices, rows, columns, segments) -> one frame per source image (or source frame).

    Single-frame sources: slice ``k`` is source image ``k`` already. One multi-frame source:
    highdicom wants one frame per source frame, so slices go to their frame numbers and frames
    the volume left out (localizers, duplicates) stay empty.
    """
    if not sources.multiframe:
        return stacked
    n_frames = int(sources.datasets[0].get("NumberOfFrames", 1) or 1)
    out = np.zeros((n_frames, *stacked.shape[1:]), dtype=stacked.dtype)
    for k, frame in enumerate(sources.slice_frame):
        out[int(frame) - 1] = stacked[k]  # type: ignore[arg-type]
    return out


def build_segmentation(
    volume: Volume,
    result: DetectionResult,
    job: JobContext,
    identity: OutputIdentity,
    *,
    segmentation_type: str = BINARY,
) -> tuple[hd.seg.Segmentation, list[SegmentRef]] | None:
    """The SEG for ``result``, or ``None`` when no finding has a non-empty mask (see module doc)."""
    if segmentation_type not in SEGMENTATION_TYPES:
        raise ValueError(f"segmentation_type must be one of {SEGMENTATION_TYPES}, got {segmentation_type!r}")
    arrays: list[np.ndarray] = []
    refs: list[SegmentRef] = []
    descriptions: list[hd.seg.SegmentDescription] = []
    algorithm = algorithm_identification(job)
    for index, finding in enumerate(result.findings):
        arr = _finding_array(finding, segmentation_type)
        if arr is None:
            continue
        if arr.shape != volume.shape:
            raise JobError(f"finding {index + 1}: mask shape {arr.shape} differs from volume {volume.shape}")
        number = len(arrays) + 1
        uid = tracking_uid(job, index)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=finding_identifier(finding, index + 1),
                segmented_property_category=coded(finding.category or category_for(finding.label)),
                segmented_property_type=coded(finding.label),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=uid,
                tracking_id=finding_identifier(finding, index + 1),
                anatomic_regions=[coded(finding.site)] if finding.site else None,
                display_color=hd.color.CIELabColor.from_rgb(*_PALETTE[(number - 1) % len(_PALETTE)]),
            )
        )
        refs.append(SegmentRef(finding_index=index, segment_number=number, tracking_uid=uid))
        arrays.append(arr)
    if not arrays:
        return None

    sources = source_images(volume)
    pixel_array = _frames_for_sources(np.stack(arrays, axis=-1), sources)
    model = job.model
    seg = hd.seg.Segmentation(
        source_images=sources.datasets,
        pixel_array=pixel_array,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=1,
        manufacturer=model.manufacturer[:64],
        manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64],
        device_serial_number=job.node.name[:64],
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_label="AI_RESULT",
        content_description=f"AI output, not verified: {model.name} {display_version(model.version)}"[:64],
        omit_empty_frames=True,
        workers=0,
    )
    # highdicom draws a random Dimension Organization UID; derive it like every other UID so
    # that encoding the same job twice gives the same bytes.
    dim_uid = derive_uid(identity.sop_instance_uid, "dimension-organization")
    for item in [*seg.get("DimensionOrganizationSequence", []), *seg.get("DimensionIndexSequence", [])]:
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    seg.SeriesDescription = identity.series_description
    seg.StationName = job.node.ae_title[:16]
    # highdicom types this as its ContributingEquipment, which only takes DCM purposes; IHE AIR
    # needs the 99IHE one, so the sequence is built with pydicom.
    seg.ContributingEquipmentSequence = contributing_equipment(job)  # type: ignore[assignment]
    stamp_dates(seg, job)
    return seg, refs
