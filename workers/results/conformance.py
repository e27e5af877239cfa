"""The conformance gate: every result object is checked before it is stored or sent.

At run time :func:`check_object` applies the rules that the consumers we target need and
raises :class:`~dicom_node.errors.ConformanceError` with the reasons; the job then fails with
that reason instead of sending something the PACS or viewer would mangle. The rules:

* all objects: the bytes parse back; right SOP class for the kind; same Study Instance UID and
  patient as the source; well-formed UIDs, equal to the deterministic ones of the job; a new
  series; Series Description marking AI output; IHE AIR Contributing Equipment (Purpose of
  Reference "Processing Algorithm", Manufacturer, Model Name, Software Versions, Device UID).
* SEG (OHIF): exactly one item in ReferencedSeriesSequence, the source series; frames derived
  only from source images; same Frame of Reference; every segment AUTOMATIC with algorithm
  name, version and family, coded category and type, and a Tracking UID.
* SR (OHIF, TID 1500): root concept (126000 DCM) Imaging Measurement Report, template 1500;
  device observer; UNVERIFIED; measurement groups (125007) inside Imaging Measurements
  (126010), each with Tracking Identifier and a unique Tracking Unique Identifier, algorithm
  name and version; or, when there are no groups, an explicit "without findings" summary.
  The viewer SR additionally must have exactly one 2D SCOORD per group (a type OHIF draws)
  on a source image, no SCOORD3D and no SEG references anywhere (they blank OHIF), and
  evidence from the source series only. An SR that supersedes one names it in its Predecessor
  Documents Sequence.
* KOS (IHE IOCM rejection note, ``workers.results.kos``): title (113001 DCM), TID 2010, and
  exactly the superseded objects in its content and its evidence, all in the result's study.
* SC key images (``workers.results.sc``): Burned In Annotation YES, Image Type DERIVED, one
  Source Image Sequence item naming an image of the source series, 8-bit RGB or MONOCHROME2
  pixels, a series description saying "not verified", instance number as stored.
* GSPS (``workers.results.gsps``): applies to images of the source series only; every
  graphic annotation on a source image with a closed POLYLINE box in PIXEL units; a graphic
  layer that is declared.
* Key image note (``workers.results.key_images``): title (113000 DCM) "Of Interest", TID 2010,
  at least one source image flagged, anything else flagged only our SC images or GSPS, the
  same objects in content and evidence, all in the result's study.

:func:`run_dciodvfy` runs the dicom3tools validator (tests use it on every object; at run time
it is used when installed and asked for). Messages never contain UIDs or patient data.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.errors import ConformanceError
from dicom_node.phi import scrub_text
from dicom_node.uids import uid_problem
from workers.results.identity import (
    AIR_PROCESSING_ALGORITHM,
    KIND_GSPS,
    KIND_KEY_IMAGES,
    KIND_KOS,
    KIND_SC,
    KIND_SEG,
    KIND_SR,
    KIND_SR_VOLUMETRIC,
    JobContext,
    OutputIdentity,
)
from workers.results.kos import predecessor_problems, rejection_note_problems
from workers.results.objects import (
    GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    SEGMENTATION_STORAGE,
    SOP_CLASS_BY_KIND,
    EncodedObject,
)
from workers.volume import Volume

OHIF_GRAPHIC_TYPES = frozenset({"POINT", "MULTIPOINT", "POLYLINE", "CIRCLE", "ELLIPSE"})

_DCM = "DCM"
IMAGING_MEASUREMENT_REPORT = ("126000", _DCM)
IMAGING_MEASUREMENTS = ("126010", _DCM)
MEASUREMENT_GROUP = ("125007", _DCM)
TRACKING_IDENTIFIER = ("112039", _DCM)
TRACKING_UNIQUE_IDENTIFIER = ("112040", _DCM)
ALGORITHM_NAME = ("111001", _DCM)
ALGORITHM_VERSION = ("111003", _DCM)
OBSERVER_TYPE = ("121005", _DCM)
DEVICE = ("121007", _DCM)
DEVICE_OBSERVER_UID = ("121012", _DCM)
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
FINDINGS_SUMMARY = ("111017", _DCM)
WITH_FINDINGS = ("111242", _DCM)
WITHOUT_FINDINGS = ("111241", _DCM)


@dataclass(frozen=True)
class SourceFacts:
    """What the gate compares an object against: the source series and the job."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: frozenset[str]
    frame_of_reference_uid: str | None
    patient_id: str | None

    @classmethod
    def from_volume(cls, volume: Volume, job: JobContext) -> SourceFacts:
        first = volume.headers[0] if volume.headers else None
        return cls(
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=volume.series_instance_uid,
            sop_instance_uids=frozenset(s.sop_instance_uid for s in volume.slices),
            frame_of_reference_uid=volume.frame_of_reference_uid,
            patient_id=None if first is None else str(first.get("PatientID", "")),
        )


# -- helpers -----------------------------------------------------------------------------------


def _code(item: Dataset, attr: str) -> tuple[str, str] | None:
    seq = item.get(attr)
    if not seq:
        return None
    c = seq[0]
    return (str(c.get("CodeValue", c.get("LongCodeValue", ""))), str(c.get("CodingSchemeDesignator", "")))


def _name(item: Dataset) -> tuple[str, str] | None:
    return _code(item, "ConceptNameCodeSequence")


def _children(item: Dataset) -> list[Dataset]:
    return list(item.get("ContentSequence", []))


def _walk(item: Dataset) -> Iterator[Dataset]:
    for child in _children(item):
        yield child
        yield from _walk(child)


def _referenced_sops(item: Dataset) -> list[tuple[str, str]]:
    return [
        (str(r.get("ReferencedSOPClassUID", "")), str(r.get("ReferencedSOPInstanceUID", "")))
        for r in item.get("ReferencedSOPSequence", [])
    ]


def _uid_ok(value: object) -> bool:
    return uid_problem(value, strict=True) is None


# -- common rules ------------------------------------------------------------------------------


def _common_problems(
    ds: Dataset, kind: str, facts: SourceFacts, job: JobContext, expected: OutputIdentity | None
) -> list[str]:
    p: list[str] = []
    if str(ds.get("SOPClassUID", "")) != SOP_CLASS_BY_KIND[kind]:
        p.append(f"{kind}: wrong SOP class for this kind of output")
    for attr in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not _uid_ok(ds.get(attr)):
            p.append(f"{kind}: {attr} is not a valid UID")
    if str(ds.get("StudyInstanceUID", "")) != facts.study_instance_uid:
        p.append(f"{kind}: Study Instance UID differs from the source study")
    if str(ds.get("SeriesInstanceUID", "")) == facts.series_instance_uid:
        p.append(f"{kind}: reuses the source Series Instance UID")
    if expected is not None:
        if str(ds.get("SOPInstanceUID", "")) != expected.sop_instance_uid:
            p.append(f"{kind}: SOP Instance UID is not the job's deterministic UID")
        if str(ds.get("SeriesInstanceUID", "")) != expected.series_instance_uid:
            p.append(f"{kind}: Series Instance UID is not the job's deterministic UID")
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("MediaStorageSOPInstanceUID", "")) != str(ds.get("SOPInstanceUID", "")):
        p.append(f"{kind}: file meta information does not match the dataset")
    if facts.patient_id is not None and str(ds.get("PatientID", "")) != facts.patient_id:
        p.append(f"{kind}: Patient ID differs from the source images")
    if not str(ds.get("SeriesDescription", "")).startswith("AI"):
        p.append(f"{kind}: Series Description does not mark the series as AI output")
    p += _contributing_equipment_problems(ds, kind, job)
    return p


def _contributing_equipment_problems(ds: Dataset, kind: str, job: JobContext) -> list[str]:
    items = [
        item
        for item in ds.get("ContributingEquipmentSequence", [])
        if _code(item, "PurposeOfReferenceCodeSequence") == AIR_PROCESSING_ALGORITHM[:2]
    ]
    if not items:
        return [f"{kind}: no Contributing Equipment item with Purpose of Reference 'Processing Algorithm' (IHE AIR)"]
    p = []
    item = items[0]
    for attr in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions"):
        if not item.get(attr):
            p.append(f"{kind}: Contributing Equipment (algorithm) lacks {attr}")
    if not _uid_ok(item.get("DeviceUID")):
        p.append(f"{kind}: Contributing Equipment (algorithm) lacks a valid Device UID")
    if str(item.get("ManufacturerModelName", "")) != job.model.name[:64]:
        p.append(f"{kind}: Contributing Equipment names a different model")
    if str(item.get("SoftwareVersions", "")) != job.model.version[:64]:
        p.append(f"{kind}: Contributing Equipment names a different model version")
    return p


# -- SEG ---------------------------------------------------------------------------------------


def _seg_problems(ds: Dataset, facts: SourceFacts) -> list[str]:
    p: list[str] = []
    refs = list(ds.get("ReferencedSeriesSequence", []))
    if len(refs) != 1:
        p.append(f"seg: ReferencedSeriesSequence must have exactly one item (has {len(refs)})")
    elif str(refs[0].get("SeriesInstanceUID", "")) != facts.series_instance_uid:
        p.append("seg: ReferencedSeriesSequence does not point at the source series")
    else:
        outside = [
            r for r in refs[0].get("ReferencedInstanceSequence", [])
            if str(r.get("ReferencedSOPInstanceUID", "")) not in facts.sop_instance_uids
        ]
        if outside:
            p.append(f"seg: ReferencedSeriesSequence lists {len(outside)} instance(s) outside the source series")
    if facts.frame_of_reference_uid and str(ds.get("FrameOfReferenceUID", "")) != facts.frame_of_reference_uid:
        p.append("seg: Frame of Reference differs from the source series")
    if str(ds.get("SegmentationType", "")) not in ("BINARY", "FRACTIONAL"):
        p.append("seg: SegmentationType is neither BINARY nor FRACTIONAL")
    if int(ds.get("NumberOfFrames", 0) or 0) < 1:
        p.append("seg: has no frames")
    foreign = 0
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for deriv in frame.get("DerivationImageSequence", []):
            for src in deriv.get("SourceImageSequence", []):
                if str(src.get("ReferencedSOPInstanceUID", "")) not in facts.sop_instance_uids:
                    foreign += 1
    if foreign:
        p.append(f"seg: {foreign} frame(s) derived from images outside the source series")
    segments = list(ds.get("SegmentSequence", []))
    if not segments:
        p.append("seg: no segments")
    for seg in segments:
        n = seg.get("SegmentNumber", "?")
        if str(seg.get("SegmentAlgorithmType", "")) != "AUTOMATIC":
            p.append(f"seg: segment {n} is not marked AUTOMATIC")
        if not seg.get("SegmentAlgorithmName"):
            p.append(f"seg: segment {n} lacks SegmentAlgorithmName")
        algo = seg.get("SegmentationAlgorithmIdentificationSequence")
        if not algo or not algo[0].get("AlgorithmName") or not algo[0].get("AlgorithmVersion") or not algo[0].get("AlgorithmFamilyCodeSequence"):
            p.append(f"seg: segment {n} lacks algorithm identification (name, version, family)")
        if _code(seg, "SegmentedPropertyCategoryCodeSequence") is None or _code(seg, "SegmentedPropertyTypeCodeSequence") is None:
            p.append(f"seg: segment {n} lacks a coded category or type")
        if not _uid_ok(seg.get("TrackingUID")):
            p.append(f"seg: segment {n} lacks a valid Tracking UID")
    return p


# -- SR ----------------------------------------------------------------------------------------


def _sr_problems(ds: Dataset, kind: str, facts: SourceFacts, finding_count: int | None) -> list[str]:
    p: list[str] = []
    if _name(ds) != IMAGING_MEASUREMENT_REPORT or ds.get("ValueType") != "CONTAINER":
        return [f"{kind}: root is not an Imaging Measurement Report (126000) container; OHIF shows only TID 1500"]
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "1500":
        p.append(f"{kind}: root does not declare template TID 1500")
    if str(ds.get("VerificationFlag", "")) != "UNVERIFIED":
        p.append(f"{kind}: machine output must be UNVERIFIED")
    root_items = _children(ds)
    observer_types = [_code(i, "ConceptCodeSequence") for i in root_items if _name(i) == OBSERVER_TYPE]
    device_uids = [i.get("UID") for i in root_items if _name(i) == DEVICE_OBSERVER_UID]
    if DEVICE not in observer_types or not device_uids or not _uid_ok(device_uids[0]):
        p.append(f"{kind}: observer context does not name a device observer with a valid UID")

    containers = [i for i in root_items if _name(i) == IMAGING_MEASUREMENTS]
    groups: list[Dataset] = []
    if len(containers) > 1:
        p.append(f"{kind}: more than one Imaging Measurements (126010) container")
    for container in containers:
        for child in _children(container):
            if _name(child) != MEASUREMENT_GROUP or child.get("ValueType") != "CONTAINER":
                p.append(f"{kind}: Imaging Measurements holds an item that is not a Measurement Group (125007)")
            else:
                groups.append(child)
    summaries = [
        _code(i, "ConceptCodeSequence")
        for q in root_items if _name(q) == QUALITATIVE_EVALUATIONS
        for i in _children(q) if _name(i) == FINDINGS_SUMMARY
    ]
    if not groups:
        if WITHOUT_FINDINGS not in summaries:
            p.append(f"{kind}: no measurement groups and no explicit 'without findings' statement")
    elif WITHOUT_FINDINGS in summaries:
        p.append(f"{kind}: says 'without findings' but has measurement groups")
    if finding_count is not None and len(groups) != finding_count:
        p.append(f"{kind}: {len(groups)} measurement group(s) for {finding_count} finding(s)")

    seen: set[str] = set()
    for n, group in enumerate(groups, start=1):
        items = _children(group)
        ids = [i for i in items if _name(i) == TRACKING_IDENTIFIER and i.get("ValueType") == "TEXT" and i.get("TextValue")]
        uids = [i for i in items if _name(i) == TRACKING_UNIQUE_IDENTIFIER and i.get("ValueType") == "UIDREF"]
        if not ids:
            p.append(f"{kind}: group {n} lacks a Tracking Identifier (112039)")
        if len(uids) != 1 or not _uid_ok(uids[0].get("UID")):
            p.append(f"{kind}: group {n} lacks exactly one valid Tracking Unique Identifier (112040)")
        else:
            uid = str(uids[0].UID)
            if uid in seen:
                p.append(f"{kind}: group {n} repeats another group's Tracking Unique Identifier")
            seen.add(uid)
        names = {_name(i) for i in _walk(group)}
        if ALGORITHM_NAME not in names or ALGORITHM_VERSION not in names:
            p.append(f"{kind}: group {n} lacks algorithm identification (name and version)")
        if kind == KIND_SR:
            p += _viewer_group_problems(group, n, facts)

    if kind == KIND_SR:
        p += _viewer_document_problems(ds, facts)
    return p


def _viewer_group_problems(group: Dataset, n: int, facts: SourceFacts) -> list[str]:
    p: list[str] = []
    scoords = [i for i in _children(group) if i.get("ValueType") == "SCOORD"]
    if len(scoords) != 1:
        p.append(f"sr: group {n} needs exactly one 2D SCOORD for OHIF (has {len(scoords)})")
    for scoord in scoords:
        if str(scoord.get("GraphicType", "")) not in OHIF_GRAPHIC_TYPES:
            p.append(f"sr: group {n} uses a graphic type OHIF cannot draw")
        images = [r for i in _children(scoord) for r in _referenced_sops(i)]
        if len(images) != 1 or images[0][1] not in facts.sop_instance_uids:
            p.append(f"sr: group {n} SCOORD is not drawn on one image of the source series")
        if str(scoord.get("GraphicType", "")) == "POLYLINE":
            data = [float(v) for v in scoord.get("GraphicData", [])]
            if len(data) < 8 or data[:2] != data[-2:]:
                p.append(f"sr: group {n} POLYLINE box is not closed")
    return p


def _viewer_document_problems(ds: Dataset, facts: SourceFacts) -> list[str]:
    p: list[str] = []
    for item in _walk(ds):
        if item.get("ValueType") == "SCOORD3D":
            p.append("sr: contains SCOORD3D, which blanks the OHIF viewport; it belongs in the volumetric SR")
            break
    for item in _walk(ds):
        if any(cls == SEGMENTATION_STORAGE for cls, _ in _referenced_sops(item)):
            p.append("sr: references a SEG (volumetric group), which blanks the OHIF viewport")
            break
    series = [
        s
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for s in study.get("ReferencedSeriesSequence", [])
    ]
    if len(series) != 1 or str(series[0].get("SeriesInstanceUID", "")) != facts.series_instance_uid:
        p.append("sr: evidence must be exactly the source series")
    studies = {str(s.get("StudyInstanceUID", "")) for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])}
    if studies and studies != {facts.study_instance_uid}:
        p.append("sr: evidence from another study")
    return p


# -- viewer outputs beyond OHIF -----------------------------------------------------------------


def _sc_problems(ds: Dataset, facts: SourceFacts, number: int) -> list[str]:
    p: list[str] = []
    if str(ds.get("BurnedInAnnotation", "")) != "YES":
        p.append("sc: Burned In Annotation is not YES (the image carries burned-in text)")
    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    if not image_type or image_type[0] != "DERIVED":
        p.append("sc: Image Type is not DERIVED")
    sources = list(ds.get("SourceImageSequence", []))
    if len(sources) != 1 or str(sources[0].get("ReferencedSOPInstanceUID", "")) not in facts.sop_instance_uids:
        p.append("sc: Source Image Sequence does not name one image of the source series")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in ("RGB", "MONOCHROME2") or int(ds.get("BitsAllocated", 0) or 0) != 8:
        p.append("sc: pixels are not 8-bit RGB or MONOCHROME2")
    if not int(ds.get("Rows", 0) or 0) or not int(ds.get("Columns", 0) or 0) or "PixelData" not in ds:
        p.append("sc: has no pixels")
    if "not verified" not in str(ds.get("SeriesDescription", "")):
        p.append("sc: Series Description does not say the result is not verified")
    if int(ds.get("InstanceNumber", 0) or 0) != number:
        p.append("sc: Instance Number differs from the stored instance's number")
    return p


def _gsps_problems(ds: Dataset, facts: SourceFacts) -> list[str]:
    p: list[str] = []
    series = list(ds.get("ReferencedSeriesSequence", []))
    if not series or any(str(s.get("SeriesInstanceUID", "")) != facts.series_instance_uid for s in series):
        p.append("gsps: does not apply to the source series only")
    outside = [
        r for s in series for r in s.get("ReferencedImageSequence", [])
        if str(r.get("ReferencedSOPInstanceUID", "")) not in facts.sop_instance_uids
    ]
    if outside:
        p.append(f"gsps: applies to {len(outside)} image(s) outside the source series")
    layers = {str(layer.get("GraphicLayer", "")) for layer in ds.get("GraphicLayerSequence", [])}
    annotations = list(ds.get("GraphicAnnotationSequence", []))
    if not annotations:
        p.append("gsps: no graphic annotations")
    for n, annotation in enumerate(annotations, start=1):
        images = [str(r.get("ReferencedSOPInstanceUID", "")) for r in annotation.get("ReferencedImageSequence", [])]
        if not images or any(uid not in facts.sop_instance_uids for uid in images):
            p.append(f"gsps: annotation {n} is not drawn on images of the source series")
        if str(annotation.get("GraphicLayer", "")) not in layers:
            p.append(f"gsps: annotation {n} is on an undeclared graphic layer")
        boxes = [
            g for g in annotation.get("GraphicObjectSequence", [])
            if str(g.get("GraphicType", "")) == "POLYLINE" and str(g.get("GraphicAnnotationUnits", "")) == "PIXEL"
        ]
        data = [float(v) for v in boxes[0].get("GraphicData", [])] if boxes else []
        if len(data) < 8 or data[:2] != data[-2:]:
            p.append(f"gsps: annotation {n} has no closed POLYLINE box in PIXEL units")
    return p


def _key_image_problems(ds: Dataset, facts: SourceFacts) -> list[str]:
    p: list[str] = []
    if _name(ds) != ("113000", _DCM) or ds.get("ValueType") != "CONTAINER":
        p.append("key-images: title is not (113000, DCM) 'Of Interest' (CID 7010)")
    templates = ds.get("ContentTemplateSequence", [])
    if not templates or str(templates[0].get("TemplateIdentifier", "")) != "2010":
        p.append("key-images: root does not declare template TID 2010")
    content = {
        ref
        for item in ds.get("ContentSequence", [])
        if item.get("ValueType") in ("IMAGE", "COMPOSITE")
        for ref in _referenced_sops(item)
    }
    evidence = {
        ref
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for ref in _referenced_sops(series)
    }
    if not any(uid in facts.sop_instance_uids for _, uid in content):
        p.append("key-images: flags no image of the source series")
    ours = (SECONDARY_CAPTURE_IMAGE_STORAGE, GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE)
    if any(uid not in facts.sop_instance_uids and cls not in ours for cls, uid in content):
        p.append("key-images: flags objects that are neither source images nor our key images or presentation state")
    if content != evidence:
        p.append("key-images: content and evidence do not list the same objects")
    studies = {str(s.get("StudyInstanceUID", "")) for s in ds.get("CurrentRequestedProcedureEvidenceSequence", [])}
    if studies != {facts.study_instance_uid}:
        p.append("key-images: evidence is not all in the study of the result")
    return p


# -- entry points ------------------------------------------------------------------------------


def object_problems(
    obj: EncodedObject,
    facts: SourceFacts,
    job: JobContext,
    *,
    expected: OutputIdentity | None = None,
    finding_count: int | None = None,
) -> list[str]:
    """Every rule ``obj`` breaks (empty when it passes). Checks the bytes, not a live dataset."""
    try:
        ds = pydicom.dcmread(io.BytesIO(obj.data))
        # pydicom stops quietly at a truncation; writing the parsed file again must give the
        # very same bytes, which proves every element was read.
        again = io.BytesIO()
        ds.save_as(again, enforce_file_format=True)
        complete = again.getvalue() == obj.data
    except Exception as exc:  # any parse failure means the file is unusable
        return [f"{obj.kind}: the encoded file cannot be read back ({type(exc).__name__})"]
    if not complete:
        return [f"{obj.kind}: the encoded file cannot be read back completely (truncated or malformed)"]
    problems = _common_problems(ds, obj.kind, facts, job, expected)
    if obj.kind == KIND_SEG:
        problems += _seg_problems(ds, facts)
    elif obj.kind in (KIND_SR, KIND_SR_VOLUMETRIC):
        problems += _sr_problems(ds, obj.kind, facts, finding_count if obj.kind == KIND_SR else None)
        problems += predecessor_problems(ds, obj.kind, job)
    elif obj.kind == KIND_KOS:
        problems += rejection_note_problems(ds, job)
    elif obj.kind == KIND_SC:
        problems += _sc_problems(ds, facts, obj.number)
    elif obj.kind == KIND_GSPS:
        problems += _gsps_problems(ds, facts)
    elif obj.kind == KIND_KEY_IMAGES:
        problems += _key_image_problems(ds, facts)
    return problems


def check_object(
    obj: EncodedObject,
    facts: SourceFacts,
    job: JobContext,
    *,
    expected: OutputIdentity | None = None,
    finding_count: int | None = None,
    dciodvfy: bool = False,
) -> None:
    """Raise :class:`ConformanceError` naming every broken rule; with ``dciodvfy=True`` also
    require zero dciodvfy errors when the validator is installed."""
    problems = object_problems(obj, facts, job, expected=expected, finding_count=finding_count)
    if dciodvfy and dciodvfy_available():
        errors = run_dciodvfy(obj.data).errors
        if errors:
            # dciodvfy quotes attribute values (patient data among them): keep its verdict, not
            # the values, in a reason that goes into the job record.
            first = scrub_text(errors[0])
            problems.append(f"{obj.kind}: dciodvfy reported {len(errors)} error(s), first: {first}")
    if problems:
        raise ConformanceError("; ".join(problems))


# -- dciodvfy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DciodvfyReport:
    """dciodvfy's verdict on one file."""

    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def run_dciodvfy(source: bytes | Path, *, timeout: float = 120.0) -> DciodvfyReport:
    """Run ``dciodvfy`` on a file (or on Part 10 bytes) and split its findings.

    dciodvfy's messages quote attribute values (including patient data), so the report is for
    tests and operators' eyes, never for logs or job records.
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise FileNotFoundError("dciodvfy is not installed (Debian package dicom3tools)")
    with tempfile.TemporaryDirectory(prefix="dciodvfy-") as tmp:
        if isinstance(source, bytes | bytearray):
            path = Path(tmp) / "object.dcm"
            path.write_bytes(source)
        else:
            path = Path(source)
        proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=timeout, check=False)
    text = proc.stdout + proc.stderr
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return DciodvfyReport(
        errors=[ln for ln in lines if ln.startswith("Error")],
        warnings=[ln for ln in lines if ln.startswith("Warning")],
        output=text,
    )


def dciodvfy_errors(source: bytes | Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for ``source`` (empty means it passes)."""
    return run_dciodvfy(source).errors
