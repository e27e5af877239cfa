"""Deterministic identity (same job -> same UIDs and bytes; another model -> new UIDs), the
conformance gate (each rule refuses a broken object with its reason), dciodvfy, and storage."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_node.errors import ConformanceError, JobError
from dicom_node.uids import is_valid_uid
from tests import dicomgen
from tests.resultdata import detection, job_for, load_volume, model_info, read, sphere_finding
from workers.results import (
    KIND_SEG,
    KIND_SR,
    KIND_SR_VOLUMETRIC,
    EncodedObject,
    EncodeOptions,
    SourceFacts,
    check_object,
    dciodvfy_errors,
    encode_results,
    expected_identities,
    load_results,
    object_problems,
    run_dciodvfy,
    write_results,
)

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


@pytest.fixture
def ct(tmp_path: Path):
    paths = dicomgen.ct_series(tmp_path / "ct", slices=10, size=64, pixel_spacing=0.8, slice_thickness=2.0)
    return load_volume(paths)


@pytest.fixture
def findings(ct):
    return [sphere_finding(ct, (3, 20, 20), 3.0), sphere_finding(ct, (6, 40, 44), 4.0, confidence=0.55)]


def _by_kind(objects):
    return {o.kind: o for o in objects}


def _all(ct, findings, job, **options):
    return _by_kind(encode_results(ct, detection(ct, findings, job.model), job, EncodeOptions(volumetric_sr=True, **options)))


# -- deterministic identity -------------------------------------------------------------------


def test_same_job_gives_byte_identical_objects(ct, findings, tmp_path: Path) -> None:
    job = job_for(ct)
    first = _all(ct, findings, job)
    time.sleep(1.1)  # a clock read anywhere in encoding would now show up in the bytes
    second = _all(ct, findings, job_for(ct, job_id="job-2"))  # a re-run is another job record
    assert set(first) == {KIND_SR, KIND_SEG, KIND_SR_VOLUMETRIC}
    for kind in first:
        assert first[kind].data == second[kind].data, kind
    paths_a = write_results(list(first.values()), tmp_path / "a")
    paths_b = write_results(list(second.values()), tmp_path / "b")
    assert [p.read_bytes() for p in paths_a] == [p.read_bytes() for p in paths_b]


def test_uids_are_valid_and_distinct(ct, findings) -> None:
    objects = _all(ct, findings, job_for(ct))
    uids = []
    for obj in objects.values():
        ds = read(obj.data)
        uids += [ds.SOPInstanceUID, ds.SeriesInstanceUID]
        assert is_valid_uid(ds.SOPInstanceUID, strict=True) and is_valid_uid(ds.SeriesInstanceUID, strict=True)
        assert ds.SeriesInstanceUID != ct.series_instance_uid
        assert ds.StudyInstanceUID == ct.study_instance_uid
    assert len(set(uids)) == len(uids)
    assert [read(objects[k].data).SeriesNumber for k in (KIND_SR, KIND_SEG, KIND_SR_VOLUMETRIC)] == [9001, 9002, 9003]


@pytest.mark.parametrize(
    "change",
    ["model version", "weights", "model name", "input set", "segmentation type", "re-run generation"],
)
def test_anything_that_changes_the_content_changes_the_uids(ct, findings, change: str) -> None:
    base_job = job_for(ct)
    base = _all(ct, findings, base_job)
    options: dict[str, object] = {}
    if change == "model version":
        job = job_for(ct, model_info("1.3.0"))
    elif change == "weights":
        job = job_for(ct, model_info(weights="cd" * 32))
    elif change == "model name":
        job = job_for(ct, model_info(name="lung-nodules-large"))
    elif change == "input set":
        job = job_for(ct, input_hash="0" * 64)
    elif change == "re-run generation":
        # A re-run of the same input set (e.g. back to an earlier model version) never reuses
        # the UIDs that an earlier rejection note withdrew.
        job = job_for(ct, generation=1)
    else:
        job, options = base_job, {"segmentation_type": "FRACTIONAL"}
    other = _all(ct, findings, job, **options)
    changed = {KIND_SEG, KIND_SR_VOLUMETRIC} if change == "segmentation type" else set(base)
    for kind in base:
        same = base[kind].sop_instance_uid == other[kind].sop_instance_uid
        assert same is (kind not in changed), kind
        assert (base[kind].series_instance_uid == other[kind].series_instance_uid) is same, kind
    if change.startswith("model") or change == "weights":
        algo_a = read(base[KIND_SR].data).ContributingEquipmentSequence[0]
        algo_b = read(other[KIND_SR].data).ContributingEquipmentSequence[0]
        assert algo_a.DeviceUID != algo_b.DeviceUID


def test_expected_identities_match_what_is_encoded(ct, findings) -> None:
    job = job_for(ct)
    objects = _all(ct, findings, job)
    ids = expected_identities(job, EncodeOptions(volumetric_sr=True))
    for kind, obj in objects.items():
        assert (obj.series_instance_uid, obj.sop_instance_uid) == (ids[kind].series_instance_uid, ids[kind].sop_instance_uid)


# -- the gate ---------------------------------------------------------------------------------


def _mutated(obj: EncodedObject, change) -> EncodedObject:
    ds = copy.deepcopy(obj.dataset)
    change(ds)
    return EncodedObject.from_dataset(obj.kind, ds)


def _root_item(ds: Dataset, code: str) -> Dataset:
    return next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code)


def _first_group(ds: Dataset) -> Dataset:
    return _root_item(ds, "126010").ContentSequence[0]


def _drop_tracking_uid(ds: Dataset) -> None:
    group = _first_group(ds)
    group.ContentSequence = [i for i in group.ContentSequence if i.ValueType != "UIDREF"]


def _add_scoord3d(ds: Dataset) -> None:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "SCOORD3D"
    item.GraphicType, item.GraphicData = "POINT", [0.0, 0.0, 0.0]
    item.ReferencedFrameOfReferenceUID = "1.2.3"
    _first_group(ds).ContentSequence.append(item)


def _open_box(ds: Dataset) -> None:
    scoord = next(i for i in _first_group(ds).ContentSequence if i.ValueType == "SCOORD")
    scoord.GraphicData = list(scoord.GraphicData)[:-2]


def _second_referenced_series(ds: Dataset) -> None:
    extra = copy.deepcopy(ds.ReferencedSeriesSequence[0])
    extra.SeriesInstanceUID = "1.2.3.4"
    ds.ReferencedSeriesSequence.append(extra)


def _segment_semiautomatic(ds: Dataset) -> None:
    ds.SegmentSequence[0].SegmentAlgorithmType = "SEMIAUTOMATIC"


def _other_study(ds: Dataset) -> None:
    ds.StudyInstanceUID = "1.2.3.4.5"


def _no_air_equipment(ds: Dataset) -> None:
    ds.ContributingEquipmentSequence = ds.ContributingEquipmentSequence[1:]


def _verified(ds: Dataset) -> None:
    ds.VerificationFlag = "VERIFIED"


def _other_root(ds: Dataset) -> None:
    ds.ConceptNameCodeSequence[0].CodeValue = "18748-4"
    ds.ConceptNameCodeSequence[0].CodingSchemeDesignator = "LN"


def _drop_summary(ds: Dataset) -> None:
    ds.ContentSequence = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue != "C0034375"]


def _no_ai_description(ds: Dataset) -> None:
    ds.SeriesDescription = "Lung nodules"


def _random_uid(ds: Dataset) -> None:
    ds.SOPInstanceUID = "2.25.1234"
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1234"


@pytest.mark.parametrize(
    ("kind", "change", "reason"),
    [
        (KIND_SR, _drop_tracking_uid, "lacks exactly one valid Tracking Unique Identifier"),
        (KIND_SR, _add_scoord3d, "SCOORD3D"),
        (KIND_SR, _open_box, "POLYLINE box is not closed"),
        (KIND_SR, _verified, "must be UNVERIFIED"),
        (KIND_SR, _other_root, "not an Imaging Measurement Report"),
        (KIND_SR, _other_study, "Study Instance UID differs"),
        (KIND_SR, _no_air_equipment, "Processing Algorithm"),
        (KIND_SR, _no_ai_description, "does not mark the series as AI output"),
        (KIND_SEG, _second_referenced_series, "exactly one item"),
        (KIND_SEG, _segment_semiautomatic, "not marked AUTOMATIC"),
        (KIND_SEG, _other_study, "Study Instance UID differs"),
        (KIND_SEG, _random_uid, "not the job's deterministic UID"),
        (KIND_SEG, _no_air_equipment, "Processing Algorithm"),
    ],
)
def test_gate_refuses_broken_objects(ct, findings, kind, change, reason: str) -> None:
    job = job_for(ct)
    obj = _all(ct, findings, job)[kind]
    facts = SourceFacts.from_volume(ct, job)
    expected = expected_identities(job, EncodeOptions(volumetric_sr=True))[kind]
    check_object(obj, facts, job, expected=expected)  # the untouched object passes
    with pytest.raises(ConformanceError, match=reason) as info:
        check_object(_mutated(obj, change), facts, job, expected=expected)
    # the reason names rules, never UIDs or patient data
    message = str(info.value)
    assert ct.study_instance_uid not in message and dicomgen.CANARY_NAME not in message
    assert dicomgen.CANARY_ID not in message


def test_gate_refuses_no_findings_without_saying_so(ct) -> None:
    job = job_for(ct)
    (sr,) = encode_results(ct, detection(ct, []), job)
    facts = SourceFacts.from_volume(ct, job)
    assert object_problems(sr, facts, job) == []
    assert any("without findings" in p for p in object_problems(_mutated(sr, _drop_summary), facts, job))


def test_gate_refuses_a_volumetric_sr_sent_as_the_viewer_sr(ct, findings) -> None:
    """The SEG-referencing groups that blank OHIF are caught if they end up in the viewer SR."""
    job = job_for(ct)
    volumetric = _all(ct, findings, job)[KIND_SR_VOLUMETRIC]
    as_viewer = EncodedObject.from_bytes(KIND_SR, volumetric.data)
    problems = object_problems(as_viewer, SourceFacts.from_volume(ct, job), job, finding_count=len(findings))
    assert any("references a SEG" in p for p in problems)
    assert any("needs exactly one 2D SCOORD" in p for p in problems)
    assert any("evidence must be exactly the source series" in p for p in problems)


def test_gate_refuses_unreadable_bytes(ct, findings) -> None:
    job = job_for(ct)
    sr = _all(ct, findings, job)[KIND_SR]
    broken = EncodedObject(
        kind=sr.kind, sop_class_uid=sr.sop_class_uid, sop_instance_uid=sr.sop_instance_uid,
        series_instance_uid=sr.series_instance_uid, study_instance_uid=sr.study_instance_uid,
        data=sr.data[:200], dataset=sr.dataset,
    )
    with pytest.raises(ConformanceError, match="cannot be read back"):
        check_object(broken, SourceFacts.from_volume(ct, job), job)


def test_gate_counts_findings(ct, findings) -> None:
    job = job_for(ct)
    sr = _all(ct, findings, job)[KIND_SR]
    facts = SourceFacts.from_volume(ct, job)
    assert object_problems(sr, facts, job, finding_count=2) == []
    assert object_problems(sr, facts, job, finding_count=3) == ["sr: 2 measurement group(s) for 3 finding(s)"]


def test_encoding_refuses_mismatched_inputs(ct, findings) -> None:
    job = job_for(ct)
    with pytest.raises(ValueError, match="different model"):
        encode_results(ct, detection(ct, findings, model_info("9.9")), job)
    with pytest.raises(ValueError, match="different study"):
        encode_results(ct, detection(ct, findings), job_for(ct, study_instance_uid="1.2.3"))
    bad = sphere_finding(ct, (5, 32, 32), 3.0)
    bad.key_slice = ct.shape[0]
    with pytest.raises(JobError, match="key slice"):
        encode_results(ct, detection(ct, [bad]), job)


def test_dciodvfy_gate_at_run_time(ct, findings) -> None:
    """With dciodvfy=True the gate also runs the validator; a real defect fails the job."""
    job = job_for(ct)
    seg = _all(ct, findings, job)[KIND_SEG]
    facts = SourceFacts.from_volume(ct, job)
    check_object(seg, facts, job, dciodvfy=True)

    def drop_type1(ds: Dataset) -> None:
        del ds.SegmentSequence[0].SegmentLabel

    broken = _mutated(seg, drop_type1)
    report = run_dciodvfy(broken.data)
    assert report.errors and any("SegmentLabel" in e for e in report.errors)
    with pytest.raises(ConformanceError, match="dciodvfy"):
        check_object(broken, facts, job, dciodvfy=True)
    assert encode_results(ct, detection(ct, findings), job, EncodeOptions(dciodvfy=True))


def test_every_generated_object_passes_dciodvfy(ct, findings) -> None:
    for options in (EncodeOptions(volumetric_sr=True), EncodeOptions(segmentation_type="FRACTIONAL", roi_shape="ellipse")):
        for obj in encode_results(ct, detection(ct, findings), job_for(ct), options):
            assert dciodvfy_errors(obj.data) == [], obj.kind


# -- storage ----------------------------------------------------------------------------------


def test_write_and_load_results(ct, findings, tmp_path: Path) -> None:
    objects = list(_all(ct, findings, job_for(ct)).values())
    out = tmp_path / "results" / "job-1"
    paths = write_results(objects, out)
    assert [p.name for p in paths] == ["sr.dcm", "seg.dcm", "sr-volumetric.dcm"]
    assert sorted(p.name for p in out.iterdir()) == ["seg.dcm", "sr-volumetric.dcm", "sr.dcm"]  # no temp files left
    again = write_results(objects, out)  # rewriting is harmless
    assert again == paths
    loaded = load_results(out)
    assert [(o.kind, o.sop_instance_uid, o.data) for o in loaded] == [(o.kind, o.sop_instance_uid, o.data) for o in objects]
    for obj in loaded:
        assert obj.sop_instance_uid not in str(out / obj.filename)
    with pytest.raises(ValueError, match="same kind"):
        write_results([objects[0], objects[0]], tmp_path / "twice")
