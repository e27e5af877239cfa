"""Superseding an earlier result set the standard way: an IHE IOCM rejection note, and the new
SR naming the one it replaces.

When a late instance changes a study's input set, the job for the new input (result version
``n + 1``) replaces the results of version ``n`` (:func:`dicom_node.jobs.result_lineage`). The
PACS must stop showing version ``n`` as current. IHE Imaging Object Change Management (IOCM,
IHE RAD TF-1 §41 and RAD TF-3 §4.66 "Rejection Note Stored" [RAD-66]) does that with a *rejection
note*: a Key Object Selection document (PS3.3 A.35.4) whose Document Title is a rejection code
of PS3.16 CID 7011 "Key Object Selection Document Title", which references every rejected SOP instance,
both in the content tree (TID 2010) and in the Current Requested Procedure Evidence Sequence, in
the same study. An IOCM Image Manager then hides (or deletes) the referenced instances.

**Which CID 7011 title.** (DCM 113001, "Rejected for Quality Reasons"): the earlier result was
made from an incomplete input set, so it is of insufficient quality and replaced; IOCM keeps
such instances retrievable by a special query (an audit can still see what was shown before).
Not 113037 "Rejected for Patient Safety Reasons" (for objects that must never be seen again,
e.g. the wrong patient's images; IOCM managers purge them and raise it as a safety event), not
113038 "Incorrect Modality Worklist Entry" (the objects were attached to the wrong order; ours
are in the right study) and not 113039 "Data Retention Policy Expired" (lifecycle deletion,
nothing wrong with the content).

The new viewer SR (and volumetric SR) carries a Predecessor Documents Sequence (PS3.3 C.17.2,
SR Document General Module) referencing the SR of the same kind it replaces.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from dicom_node.jobs import ResultRef
from workers.results.carry import TYPE2_FROM_SOURCE
from workers.results.identity import (
    NODE_MANUFACTURER,
    JobContext,
    OutputIdentity,
    contributing_equipment,
    stamp_dates,
)
from workers.results.sources import source_images
from workers.volume import Volume

REJECTED_FOR_QUALITY_REASONS = ("113001", "DCM", "Rejected for Quality Reasons")
"""PS3.16 CID 7011 title of the rejection note (see the module doc for why this one)."""
KEY_OBJECT_SELECTION_TEMPLATE = "2010"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
IMAGE_RESULT_CLASSES = frozenset({SEGMENTATION_STORAGE, SECONDARY_CAPTURE_IMAGE_STORAGE})
"""Result objects that are images (referenced as IMAGE items; the others are COMPOSITE)."""


def predecessor_of(job: JobContext, kind: str) -> ResultRef | None:
    """The superseded object of ``kind`` (the SR a new SR replaces), if the job supersedes one."""
    return next((ref for ref in job.superseded if ref.kind == kind), None)


def predecessor_documents(job: JobContext, ref: ResultRef) -> DicomSequence:
    """Predecessor Documents Sequence (Hierarchical SOP Instance Reference Macro) for ``ref``."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = ref.sop_class_uid
    sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = ref.series_instance_uid
    series.ReferencedSOPSequence = DicomSequence([sop])
    study = Dataset()
    study.StudyInstanceUID = job.study_instance_uid
    study.ReferencedSeriesSequence = DicomSequence([series])
    return DicomSequence([study])


def _evidence(volume: Volume, job: JobContext) -> list[Dataset]:
    """One small dataset per superseded object, for highdicom: the first carries the patient and
    study attributes (highdicom copies them from it), repaired like every result's sources."""
    source = source_images(volume).datasets[0]
    items = []
    for n, ref in enumerate(job.superseded):
        ds = Dataset()
        if n == 0:
            for keyword in ("SpecificCharacterSet", *TYPE2_FROM_SOURCE):
                if keyword in source:
                    setattr(ds, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
        ds.StudyInstanceUID = job.study_instance_uid
        ds.SeriesInstanceUID = ref.series_instance_uid
        ds.SOPClassUID = ref.sop_class_uid
        ds.SOPInstanceUID = ref.sop_instance_uid
        if ref.sop_class_uid in IMAGE_RESULT_CLASSES:
            # highdicom references an object with Rows and Columns as an IMAGE item (TID 2010
            # row 3); a SEG and a Secondary Capture are image IODs. The values themselves are
            # not written.
            ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        items.append(ds)
    return items


def build_rejection_note(
    volume: Volume, job: JobContext, identity: OutputIdentity
) -> hd.ko.KeyObjectSelectionDocument:
    """The IOCM rejection note withdrawing ``job.superseded`` (see module doc)."""
    if not job.superseded:
        raise ValueError("the job supersedes no result set; there is nothing to reject")
    evidence = _evidence(volume, job)
    node = job.node
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.device_uid,
            name=node.name[:64],
            manufacturer_name=NODE_MANUFACTURER,
            model_name=node.name[:64],
        ),
    )
    previous = job.result_version - 1
    content = hd.ko.KeyObjectSelection(
        document_title=hd.sr.CodedConcept(*REJECTED_FOR_QUALITY_REASONS),
        referenced_objects=evidence,
        observer_device_context=observer,
        description=(
            f"AI result {previous} of {job.model.name} {job.model.version} is superseded by "
            f"result {job.result_version}, made from a changed set of input images."
        )[:1024],
    )
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=1,
        manufacturer=NODE_MANUFACTURER,
        institution_name=node.institution_name,
    )
    note.SeriesDescription = identity.series_description
    note.ManufacturerModelName = node.name[:64]
    note.SoftwareVersions = node.software_version[:64]
    note.StationName = node.ae_title[:16]
    note.ContributingEquipmentSequence = contributing_equipment(job)  # type: ignore[assignment]
    stamp_dates(note, job)
    return note


def _code_of(item: Dataset) -> tuple[str, str] | None:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return None
    return (str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", "")))


def rejection_note_problems(ds: Dataset, job: JobContext) -> list[str]:
    """The conformance rules of a rejection note (IOCM): its title, its template, and that it
    references exactly the superseded objects, in its content and in its evidence."""
    p: list[str] = []
    if _code_of(ds) != REJECTED_FOR_QUALITY_REASONS[:2] or ds.get("ValueType") != "CONTAINER":
        p.append("kos: title is not (113001, DCM) 'Rejected for Quality Reasons' (CID 7011)")
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != KEY_OBJECT_SELECTION_TEMPLATE:
        p.append("kos: root does not declare template TID 2010")
    wanted = {(r.sop_class_uid, r.sop_instance_uid) for r in job.superseded}
    content = {
        (str(r.get("ReferencedSOPClassUID", "")), str(r.get("ReferencedSOPInstanceUID", "")))
        for item in ds.get("ContentSequence", [])
        if item.get("ValueType") in ("IMAGE", "COMPOSITE")
        for r in item.get("ReferencedSOPSequence", [])
    }
    evidence = {
        (str(r.get("ReferencedSOPClassUID", "")), str(r.get("ReferencedSOPInstanceUID", "")))
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for r in series.get("ReferencedSOPSequence", [])
    }
    if content != wanted:
        p.append("kos: content does not reference exactly the superseded objects")
    if evidence != wanted:
        p.append("kos: evidence does not list exactly the superseded objects")
    studies = {
        str(s.get("StudyInstanceUID", ""))
        for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
    }
    if studies != {job.study_instance_uid}:
        p.append("kos: evidence is not all in the study of the result")
    return p


def predecessor_problems(ds: Dataset, kind: str, job: JobContext) -> list[str]:
    """An SR that replaces an earlier one must name it in its Predecessor Documents Sequence."""
    ref = predecessor_of(job, kind)
    if ref is None:
        return []
    named = {
        str(r.get("ReferencedSOPInstanceUID", ""))
        for study in ds.get("PredecessorDocumentsSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for r in series.get("ReferencedSOPSequence", [])
    }
    if named != {ref.sop_instance_uid}:
        return [f"{kind}: Predecessor Documents Sequence does not name the SR it supersedes"]
    return []
