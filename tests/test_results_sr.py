"""TID 1500 SR from detection results: dciodvfy-clean, shaped for OHIF, read back by highdicom
with the same findings, coordinates and measurements."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from tests import dicomgen
from tests.resultdata import detection, job_for, load_volume, read, sphere_finding
from workers.findings import LUNG, NODULE
from workers.results import (
    KIND_SEG,
    KIND_SR,
    KIND_SR_VOLUMETRIC,
    EncodeOptions,
    dciodvfy_errors,
    encode_results,
)
from workers.results.identity import algorithm_device_uid, tracking_uid

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


@pytest.fixture
def ct(tmp_path: Path):
    paths = dicomgen.ct_series(tmp_path / "ct", slices=10, size=64, pixel_spacing=0.8, slice_thickness=2.0)
    return load_volume(paths)


def _by_kind(objects):
    return {o.kind: o for o in objects}


def _measurements(group) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (float(m.value), m.unit.value) for m in group.get_measurements()}


def _walk(item):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _walk(child)


def _summary(ds) -> str:
    for item in _walk(ds):
        if item.ConceptNameCodeSequence[0].CodeValue == "111017":
            return item.ConceptCodeSequence[0].CodeMeaning
    raise AssertionError("no findings summary")


def test_viewer_sr_round_trip(ct) -> None:
    findings = [sphere_finding(ct, (3, 20, 20), 3.0), sphere_finding(ct, (6, 40, 44), 4.0, confidence=0.55)]
    job = job_for(ct)
    objects = _by_kind(encode_results(ct, detection(ct, findings), job))
    sr_obj = objects[KIND_SR]
    assert dciodvfy_errors(sr_obj.data) == []

    sr = hd.sr.srread(io.BytesIO(sr_obj.data))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.StudyInstanceUID == ct.study_instance_uid
    assert sr.SeriesDescription == "AI: lung-nodules (v1.2.0)"
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    seg = read(objects[KIND_SEG].data)
    key_uids = [s.sop_instance_uid for s in ct.slices]
    for n, (group, finding) in enumerate(zip(groups, findings, strict=True)):
        assert group.tracking_uid == tracking_uid(job, n) == seg.SegmentSequence[n].TrackingUID
        assert group.tracking_identifier == f"Nodule {n + 1}"
        assert group.finding_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
        assert [s.value.value for s in group.finding_sites] == [LUNG.value]
        # the 2D box on the key slice, closed, around the mask's pixels on that slice
        c0, r0, c1, r1 = finding.bbox_2d
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert np.allclose(group.roi.value, [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
        rows, cols = np.nonzero(finding.mask[finding.key_slice])
        assert (c0, r0, c1, r1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == key_uids[finding.key_slice]
        assert _measurements(group) == {
            "Long Axis": (finding.diameter_mm, "mm"),
            "Volume": (finding.volume_mm3, "mm3"),
            "Certainty of Finding": (pytest.approx(finding.confidence * 100), "%"),
        }
        names = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in _walk(group[0])}
        assert names["Algorithm Name"].TextValue == "lung-nodules"
        assert names["Algorithm Version"].TextValue == "1.2.0"
    assert _summary(sr) == "All algorithms succeeded; with findings"


def test_viewer_sr_is_shaped_for_ohif(ct) -> None:
    """Only 2D SCOORD groups, evidence from the source series only, root 126000 / 126010 / 125007."""
    finding = sphere_finding(ct, (5, 32, 32), 4.0)
    ds = read(_by_kind(encode_results(ct, detection(ct, [finding]), job_for(ct)))[KIND_SR].data)
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    containers = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    assert len(containers) == 1
    assert [g.ConceptNameCodeSequence[0].CodeValue for g in containers[0].ContentSequence] == ["125007"]
    value_types = {i.ValueType for i in _walk(ds)}
    assert "SCOORD" in value_types and "SCOORD3D" not in value_types
    referenced_classes = {r.ReferencedSOPClassUID for i in _walk(ds) for r in i.get("ReferencedSOPSequence", [])}
    assert referenced_classes == {"1.2.840.10008.5.1.4.1.1.2"}  # CT images only, no SEG
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and len(evidence[0].ReferencedSeriesSequence) == 1
    assert evidence[0].ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_instance_uid


def test_sr_marks_unverified_machine_output_with_air_provenance(ct) -> None:
    finding = sphere_finding(ct, (5, 32, 32), 4.0)
    job = job_for(ct)
    ds = read(_by_kind(encode_results(ct, detection(ct, [finding]), job))[KIND_SR].data)
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in ds or len(ds.VerifyingObserverSequence) == 0
    # the observer is a device: the algorithm, named after the node
    root = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in ds.ContentSequence}
    assert root["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
    assert algorithm_device_uid(job.model) == root["Device Observer UID"].UID
    assert root["Device Observer Name"].TextValue == "test-node"
    assert root["Device Observer Model Name"].TextValue == "lung-nodules v1.2.0"
    # IHE AIR: algorithm in Contributing Equipment, then the node as processing equipment
    algo, node = ds.ContributingEquipmentSequence
    purpose = algo.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1", "99IHE", "Processing Algorithm"
    )
    assert (algo.Manufacturer, algo.ManufacturerModelName, algo.SoftwareVersions) == ("dicom-node", "lung-nodules", "1.2.0")
    assert algo.DeviceUID == algorithm_device_uid(job.model)
    assert node.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert (node.ManufacturerModelName, node.StationName) == ("test-node", "AINODE")
    # dates and times from the job record
    assert (ds.ContentDate, ds.ContentTime, ds.SeriesDate, ds.InstanceCreationTime) == (
        "20261129", "101530", "20261129", "101530"
    )
    assert algo.ContributionDateTime == "20261129101530"


def test_no_findings_says_so(ct) -> None:
    objects = encode_results(ct, detection(ct, []), job_for(ct))
    assert [o.kind for o in objects] == [KIND_SR]
    assert dciodvfy_errors(objects[0].data) == []
    sr = hd.sr.srread(io.BytesIO(objects[0].data))
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert _summary(sr) == "All algorithms succeeded; without findings"
    # no empty Imaging Measurements container (TID 1500 row 12 stands alone)
    assert "126010" not in {i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence}
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"


@pytest.mark.parametrize(("shape", "graphic", "points"), [("ellipse", "ELLIPSE", 4), ("point", "POINT", 1)])
def test_ellipse_and_point_annotations(ct, shape: str, graphic: str, points: int) -> None:
    finding = sphere_finding(ct, (5, 30, 34), 4.0)
    sr_obj = _by_kind(encode_results(ct, detection(ct, [finding]), job_for(ct), EncodeOptions(roi_shape=shape)))[KIND_SR]
    assert dciodvfy_errors(sr_obj.data) == []
    group = hd.sr.srread(io.BytesIO(sr_obj.data)).content.get_planar_roi_measurement_groups()[0]
    assert group.roi.graphic_type.value == graphic
    assert len(group.roi.value) == points
    centre = np.asarray(group.roi.value).mean(axis=0)
    c0, r0, c1, r1 = finding.bbox_2d
    assert np.allclose(centre, [(c0 + c1) / 2, (r0 + r1) / 2], atol=0.51)


def test_volumetric_sr_references_the_seg(ct) -> None:
    findings = [sphere_finding(ct, (3, 20, 20), 3.0), sphere_finding(ct, (6, 40, 44), 4.0)]
    job = job_for(ct)
    objects = _by_kind(encode_results(ct, detection(ct, findings), job, EncodeOptions(volumetric_sr=True)))
    assert set(objects) == {KIND_SR, KIND_SEG, KIND_SR_VOLUMETRIC}
    vol_obj, seg_obj = objects[KIND_SR_VOLUMETRIC], objects[KIND_SEG]
    assert dciodvfy_errors(vol_obj.data) == []
    assert vol_obj.series_instance_uid not in {objects[KIND_SR].series_instance_uid, seg_obj.series_instance_uid}
    sr = hd.sr.srread(io.BytesIO(vol_obj.data))
    assert sr.SeriesDescription == "AI: lung-nodules (v1.2.0) volumes"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for n, group in enumerate(groups):
        assert group.tracking_uid == tracking_uid(job, n)
        sop = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert (sop.ReferencedSOPInstanceUID, int(sop.ReferencedSegmentNumber)) == (seg_obj.sop_instance_uid, n + 1)
        assert _measurements(group)["Volume"] == (findings[n].volume_mm3, "mm3")


def test_sr_on_real_tilted_ct(real_ct: Path) -> None:
    volume = load_volume(sorted((real_ct / "ge-head-tilt").glob("*.dcm")))
    k, j, i = volume.shape
    finding = sphere_finding(volume, (k // 2, j // 2 - 40, i // 2 + 30), 10.0, label=NODULE, site=None)
    objects = _by_kind(encode_results(volume, detection(volume, [finding]), job_for(volume), EncodeOptions(volumetric_sr=True)))
    for obj in objects.values():
        assert dciodvfy_errors(obj.data) == [], obj.kind
    group = hd.sr.srread(io.BytesIO(objects[KIND_SR].data)).content.get_planar_roi_measurement_groups()[0]
    ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == volume.slices[finding.key_slice].sop_instance_uid
    assert group.finding_sites == []


def test_malformed_patient_and_study_values_never_fail_the_sr(tmp_path: Path) -> None:
    """A birth date of 'ZQCA1234'-like letters, a Study Time of '99:99', a person name with six
    components and the like (tests.test_phi_canary.MALFORMED): the SR (and SEG) are still built,
    the malformed values are emptied (Type 2) or left out, and dciodvfy finds no error."""
    from tests.test_phi_canary import MALFORMED_CANARIES, malform

    paths = dicomgen.ct_series(tmp_path / "ct", slices=6, size=64)
    malform(paths)
    volume = load_volume(paths)
    finding = sphere_finding(volume, (3, 32, 32), 3.0)
    objects = _by_kind(encode_results(volume, detection(volume, [finding]), job_for(volume)))
    assert set(objects) == {KIND_SR, KIND_SEG}
    sr = read(objects[KIND_SR].data)
    for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientName", "PatientSex",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        assert keyword in sr and sr[keyword].value in ("", None), keyword  # Type 2: present, empty
    for keyword in ("PatientBirthTime", "OtherPatientNames", "StudyDescription", "IssuerOfPatientID",
                    "Occupation", "SmokingStatus", "PatientAge", "PatientWeight", "PatientSize",
                    "ReferencedStudySequence"):
        assert keyword not in sr, keyword  # Type 3: left out
    assert sr.PatientID == dicomgen.CANARY_ID  # the PACS's patient key is carried as stored
    for obj in objects.values():
        assert dciodvfy_errors(obj.data) == [], obj.kind
        for canary in MALFORMED_CANARIES:
            assert canary.encode() not in obj.data, (obj.kind, canary)
