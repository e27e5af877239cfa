"""TID 1500 Measurement Report (highdicom Comprehensive 3D SR) shaped for OHIF and IHE AIR.

The *viewer SR* holds one TID 1410 "Planar ROI Measurements" group per finding:

* Tracking Identifier (``"Nodule 1"``) and Tracking Unique Identifier (the same UID as the
  finding's SEG segment, so the two objects can be linked);
* finding category, finding type and finding site (SNOMED);
* a 2D SCOORD on the key slice: a closed POLYLINE box (default), an ELLIPSE or a POINT,
  referencing that source image;
* Long Axis (mm), Volume (mm3), Certainty of Finding (%) and any extra measurements;
* the algorithm identification (name, version, family, manufacturer).

It never contains SCOORD3D or SEG-referencing (volumetric) groups: OHIF 3.13 shows a black
viewport for the whole SR when one such group is present (a TypeError in its SR viewport). Those
go into the optional *volumetric SR* (:func:`build_volumetric_sr`), a separate series.

Every report also carries a "Qualitative Evaluations" container (TID 1500 row 12) with
(DCM 111017 "CAD Processing and Findings Summary") = "All algorithms succeeded; with/without
findings" (CID 6047). With no findings, that is the whole content: the report says explicitly
that the algorithm ran and found nothing, and has no Imaging Measurements container (OHIF then
lists no measurements instead of failing).

The observer is a device: the algorithm (its Device UID, as in Contributing Equipment), named
after the node, with the model's name and version. The document is COMPLETE (the algorithm
added everything it will add), PRELIMINARY and UNVERIFIED: machine output no physician has
signed.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from workers.findings import (
    LONG_AXIS,
    MM,
    MM3,
    VOLUME,
    CodedConcept,
    DetectionResult,
    Finding,
)
from workers.results.identity import (
    JobContext,
    OutputIdentity,
    algorithm_device_uid,
    contributing_equipment,
    display_version,
    stamp_dates,
    tracking_uid,
)
from workers.results.kos import predecessor_documents, predecessor_of
from workers.results.seg import SegmentRef, category_for, coded, finding_identifier
from workers.results.sources import source_images
from workers.volume import Volume

CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")
PERCENT = CodedConcept("%", "UCUM", "Percent")
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
FINDINGS_SUMMARY = CodedConcept("111017", "DCM", "CAD Processing and Findings Summary")
WITH_FINDINGS = CodedConcept("111242", "DCM", "All algorithms succeeded; with findings")
WITHOUT_FINDINGS = CodedConcept("111241", "DCM", "All algorithms succeeded; without findings")
COMMENT = CodedConcept("121106", "DCM", "Comment")
OUTSIDE_RANGE_TEXT = (
    "Input outside the range this model was validated on: {reason}. The model's published "
    "figures do not apply to these findings."
)
_QUALIFIER_PREFIX = "input outside the validated range: "

ROI_SHAPES = ("box", "ellipse", "point")

# CID 100 "Quantitative Diagnostic Imaging Procedures", by modality.
_PROCEDURE_BY_MODALITY = {
    "CT": CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "PT": CodedConcept("44136-0", "LN", "PET unspecified body region"),
}
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def procedure_for(modality: str) -> CodedConcept:
    """Procedure Reported (CID 100) for the source modality."""
    return _PROCEDURE_BY_MODALITY.get(modality.upper(), IMAGING_PROCEDURE)


def roi_graphic(finding: Finding, shape: str) -> tuple[hd.sr.GraphicTypeValues, np.ndarray]:
    """The 2D SCOORD of a finding on its key slice, in image coordinates (column, row).

    ``bbox_2d`` is (col_min, row_min, col_max, row_max) in DICOM image coordinates, where the
    top-left corner of the image is (0, 0) and pixel (i, j) spans [i, i + 1) x [j, j + 1): the
    box around pixels ``i0..i1`` runs from ``i0`` to ``i1 + 1`` (what
    ``workers.models.measure.finding_from_mask`` produces). It is written unchanged.
    """
    left, top, right, bottom = (float(v) for v in finding.bbox_2d)
    if shape == "box":
        pts = [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]
        return hd.sr.GraphicTypeValues.POLYLINE, np.array(pts, dtype=np.float64)
    if shape == "ellipse":
        cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
        # major axis endpoints first, then minor axis endpoints (PS3.3 C.18.6.1.2)
        if right - left >= bottom - top:
            pts = [[left, cy], [right, cy], [cx, top], [cx, bottom]]
        else:
            pts = [[cx, top], [cx, bottom], [left, cy], [right, cy]]
        return hd.sr.GraphicTypeValues.ELLIPSE, np.array(pts, dtype=np.float64)
    if shape == "point":
        _, j, i = finding.center_ijk
        return hd.sr.GraphicTypeValues.POINT, np.array([[float(i) + 0.5, float(j) + 0.5]], dtype=np.float64)
    raise ValueError(f"roi shape must be one of {ROI_SHAPES}, got {shape!r}")


def sr_algorithm_identification(job: JobContext) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for the SR groups; the weights' SHA-256, when known, as
    an Algorithm Parameter (as in the SEG's Segment Algorithm Identification)."""
    sha = job.model.weights_sha256
    return hd.sr.AlgorithmIdentification(
        name=job.model.name[:64],
        version=job.model.version[:64],
        parameters=[f"weights_sha256={sha}"] if sha else None,
        family=coded(job.model.family),
        manufacturer=job.model.manufacturer[:64],
    )


def finding_measurements(finding: Finding, job: JobContext) -> list[hd.sr.Measurement]:
    """Long axis (mm), volume (mm3), certainty (%) and the finding's extra measurements."""
    values: list[tuple[CodedConcept, float, CodedConcept]] = [
        (LONG_AXIS, float(finding.diameter_mm), MM),
        (VOLUME, float(finding.volume_mm3), MM3),
        (CERTAINTY_OF_FINDING, round(float(finding.confidence) * 100.0, 4), PERCENT),
    ]
    values += [(m.name, float(m.value), m.unit) for m in finding.measurements]
    return [hd.sr.Measurement(name=coded(n), value=v, unit=coded(u)) for n, v, u in values]


def algorithm_observer(job: JobContext) -> hd.sr.ObserverContext:
    """Device observer: the algorithm (Device UID as in Contributing Equipment), run by the node."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=algorithm_device_uid(job.model),
        name=job.node.name[:64],
        manufacturer_name=job.model.manufacturer[:64],
        model_name=f"{job.model.name} {display_version(job.model.version)}"[:64],
    )
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)


def observation_context(job: JobContext) -> hd.sr.ObservationContext:
    """The SR's observation context: the algorithm as device observer."""
    return hd.sr.ObservationContext(observer_device_context=algorithm_observer(job))


def _summary_container(has_findings: bool, qualifier: str | None = None) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 "Qualitative Evaluations": the CAD summary and, when the model ran on
    input outside its validated range (model option ``outside_range = "qualify"``), a TEXT
    "Comment" saying so, so a reader of the report sees it beside the findings."""
    container = hd.sr.ContainerContentItem(
        name=coded(QUALITATIVE_EVALUATIONS),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=coded(FINDINGS_SUMMARY),
            value=coded(WITH_FINDINGS if has_findings else WITHOUT_FINDINGS),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    if qualifier:
        items.append(
            hd.sr.TextContentItem(
                name=coded(COMMENT),
                value=OUTSIDE_RANGE_TEXT.format(reason=qualifier.replace(_QUALIFIER_PREFIX, ""))[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _report(
    job: JobContext,
    volume: Volume,
    groups: Sequence[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
    procedure: CodedConcept | None,
    qualifier: str | None = None,
) -> hd.sr.MeasurementReport:
    proc = coded(procedure or procedure_for(volume.modality))
    context = observation_context(job)
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=context, procedure_reported=proc, imaging_measurements=list(groups)
        )
        report[0].ContentSequence.append(_summary_container(True, qualifier))
        return report
    # highdicom insists on at least one measurement group; TID 1500 does not (row 12 alone is
    # valid), so the empty report is assembled from the same parts by hand.
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(_english()))
    root.ContentSequence.extend(context)
    root.ContentSequence.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=proc,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    root.ContentSequence.append(_summary_container(False, qualifier))
    return hd.sr.MeasurementReport.from_sequence([root], copy=False)


def _qualifier(result: DetectionResult) -> str | None:
    """The detector's "outside validated range" qualifier (patient-free text), if any."""
    value = result.extra.get("qualifier") if result.extra else None
    return str(value) if value else None


def _english() -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value="en-US", scheme_designator="RFC5646", meaning="English (United States)")


def _document(
    evidence: list[Dataset],
    report: hd.sr.MeasurementReport,
    job: JobContext,
    identity: OutputIdentity,
) -> hd.sr.Comprehensive3DSR:
    model = job.model
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=1,
        manufacturer=model.manufacturer[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=job.node.institution_name,
    )
    sr.SeriesDescription = identity.series_description
    sr.ManufacturerModelName = model.name[:64]
    sr.SoftwareVersions = model.version[:64]
    sr.StationName = job.node.ae_title[:16]
    # highdicom types this as its ContributingEquipment, which only takes DCM purposes; IHE AIR
    # needs the 99IHE one, so the sequence is built with pydicom.
    sr.ContributingEquipmentSequence = contributing_equipment(job)  # type: ignore[assignment]
    predecessor = predecessor_of(job, identity.kind)
    if predecessor is not None:
        # PS3.3 C.17.2: this report replaces the one of the superseded result version.
        sr.PredecessorDocumentsSequence = predecessor_documents(job, predecessor)  # type: ignore[assignment]
    stamp_dates(sr, job)
    return sr


def build_viewer_sr(
    volume: Volume,
    result: DetectionResult,
    job: JobContext,
    identity: OutputIdentity,
    *,
    roi_shape: str = "box",
    procedure: CodedConcept | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The OHIF-displayable TID 1500 SR: 2D SCOORD groups only (see module doc)."""
    if roi_shape not in ROI_SHAPES:
        raise ValueError(f"roi_shape must be one of {ROI_SHAPES}, got {roi_shape!r}")
    sources = source_images(volume)
    algorithm = sr_algorithm_identification(job)
    groups = []
    for index, finding in enumerate(result.findings):
        k = int(finding.key_slice)
        key, frame = sources.slice_image[k], sources.slice_frame[k]
        graphic_type, graphic_data = roi_graphic(finding, roi_shape)
        region = hd.sr.ImageRegion(
            graphic_type=graphic_type,
            graphic_data=graphic_data,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=key.SOPClassUID,
                referenced_sop_instance_uid=key.SOPInstanceUID,
                referenced_frame_numbers=None if frame is None else [int(frame)],
            ),
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=tracking_uid(job, index), identifier=finding_identifier(finding, index + 1)
                ),
                referenced_region=region,
                finding_type=coded(finding.label),
                finding_category=coded(category_for(finding.label)),
                finding_sites=[hd.sr.FindingSite(coded(finding.site))] if finding.site else None,
                algorithm_id=algorithm,
                measurements=finding_measurements(finding, job),
            )
        )
    report = _report(job, volume, groups, procedure, _qualifier(result))
    return _document(sources.datasets, report, job, identity)


def build_volumetric_sr(
    volume: Volume,
    result: DetectionResult,
    job: JobContext,
    identity: OutputIdentity,
    seg: Dataset,
    segments: Sequence[SegmentRef],
    *,
    procedure: CodedConcept | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A second TID 1500 SR with one volumetric group per SEG segment (not for OHIF).

    Each group references its segment (by SEG SOP Instance UID and segment number, with the
    source series) and carries the finding's volume and certainty, under the same Tracking
    UID as the viewer SR group and the SEG segment.
    """
    sources = source_images(volume)
    algorithm = sr_algorithm_identification(job)
    groups = []
    for ref in segments:
        finding = result.findings[ref.finding_index]
        # highdicom 0.28.2: ReferencedSegment.from_segmentation() fails on its own
        # single-segment SEG (SegmentIdentificationSequence sits in the shared functional
        # groups), so the reference is built from its parts.
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=ref.segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        )
        measurements = [
            hd.sr.Measurement(name=coded(VOLUME), value=float(finding.volume_mm3), unit=coded(MM3)),
            hd.sr.Measurement(
                name=coded(CERTAINTY_OF_FINDING),
                value=round(float(finding.confidence) * 100.0, 4),
                unit=coded(PERCENT),
            ),
        ]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=ref.tracking_uid, identifier=finding_identifier(finding, ref.finding_index + 1)
                ),
                referenced_segment=referenced,
                finding_type=coded(finding.label),
                finding_category=coded(category_for(finding.label)),
                finding_sites=[hd.sr.FindingSite(coded(finding.site))] if finding.site else None,
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    report = _report(job, volume, groups, procedure, _qualifier(result))
    return _document([*sources.datasets, seg], report, job, identity)
