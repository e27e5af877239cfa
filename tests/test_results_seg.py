"""DICOM SEG from detection results: dciodvfy-clean, read back by highdicom with the same masks,
on generated CT and on the real tilted, unevenly spaced GE series."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from tests import dicomgen
from tests.resultdata import detection, job_for, load_volume, model_info, read, sphere_finding
from workers.results import KIND_SEG, KIND_SR, EncodeOptions, dciodvfy_errors, encode_results
from workers.results.identity import tracking_uid

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


@pytest.fixture
def ct(tmp_path: Path):
    paths = dicomgen.ct_series(tmp_path / "ct", slices=10, size=64, pixel_spacing=0.8, slice_thickness=2.0)
    return load_volume(paths)


def _by_kind(objects):
    return {o.kind: o for o in objects}


def _masks_by_instance(seg_bytes: bytes, volume, segment_numbers: list[int]) -> np.ndarray:
    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    uids = [s.sop_instance_uid for s in volume.slices]
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=segment_numbers, assert_missing_frames_are_empty=True
    )


def test_binary_seg_round_trip_on_generated_ct(ct) -> None:
    findings = [sphere_finding(ct, (3, 20, 20), 3.0), sphere_finding(ct, (6, 40, 44), 4.0, confidence=0.55)]
    job = job_for(ct)
    objects = _by_kind(encode_results(ct, detection(ct, findings), job))
    assert set(objects) == {KIND_SR, KIND_SEG}
    seg_obj = objects[KIND_SEG]
    assert dciodvfy_errors(seg_obj.data) == []

    ds = read(seg_obj.data)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == ct.study_instance_uid
    assert ds.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert ds.PatientID == dicomgen.CANARY_ID and str(ds.PatientName) == dicomgen.CANARY_NAME
    assert len(ds.ReferencedSeriesSequence) == 1
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_instance_uid
    assert ds.SeriesDescription == "AI: lung-nodules (v1.2.0) segmentation"

    # one segment per finding, coded and marked as automatic output of the named algorithm
    assert [s.SegmentNumber for s in ds.SegmentSequence] == [1, 2]
    for n, segment in enumerate(ds.SegmentSequence):
        assert segment.SegmentLabel == f"Nodule {n + 1}"
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"  # Nodule
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.AnatomicRegionSequence[0].CodeValue == "39607008"  # Lung
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lung-nodules", "1.2.0")
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert segment.TrackingUID == tracking_uid(job, n)

    # highdicom reads back exactly the masks, slice by source slice
    got = _masks_by_instance(seg_obj.data, ct, [1, 2])
    assert got.shape == (*ct.shape, 2)
    for n, finding in enumerate(findings):
        assert np.array_equal(got[..., n].astype(bool), finding.mask)
    # empty slices are not stored as frames
    non_empty = {k for f in findings for k in np.flatnonzero(f.mask.any(axis=(1, 2)))}
    assert int(ds.NumberOfFrames) == sum(int(f.mask.any(axis=(1, 2)).sum()) for f in findings)
    assert len(non_empty) < ct.shape[0]


@pytest.mark.parametrize("series", ["ge-head-tilt", "philips-phantom-head"])
def test_seg_geometry_on_real_ct(real_ct: Path, series: str) -> None:
    """Each SEG frame sits exactly on its source image, including gantry tilt and uneven gaps."""
    volume = load_volume(sorted((real_ct / series).glob("*.dcm")))
    if series == "ge-head-tilt":
        assert not volume.uniform and abs(volume.tilt_degrees) > 10  # the case this test is for
    k, j, i = volume.shape
    finding = sphere_finding(volume, (k // 2, j // 2, i // 2), 15.0)
    objects = _by_kind(encode_results(volume, detection(volume, [finding]), job_for(volume)))
    seg_obj = objects[KIND_SEG]
    assert dciodvfy_errors(seg_obj.data) == []

    ds = read(seg_obj.data)
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert np.allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in volume.headers[0].ImageOrientationPatient],
    )
    ipp_by_uid = {h.SOPInstanceUID: [float(v) for v in h.ImagePositionPatient] for h in volume.headers}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, ipp_by_uid[src], atol=1e-3)

    got = _masks_by_instance(seg_obj.data, volume, [1])
    assert np.array_equal(got[..., 0].astype(bool), finding.mask)
    # the patient module is carried over, with the source's missing Type 2 attributes present
    assert ds.PatientID == volume.headers[0].PatientID
    assert "PatientBirthDate" in ds and "PatientSex" in ds


def test_fractional_seg_keeps_probabilities(ct) -> None:
    finding = sphere_finding(ct, (5, 32, 32), 4.0, probability=True)
    options = EncodeOptions(segmentation_type="FRACTIONAL")
    seg_obj = _by_kind(encode_results(ct, detection(ct, [finding]), job_for(ct), options))[KIND_SEG]
    assert dciodvfy_errors(seg_obj.data) == []
    ds = read(seg_obj.data)
    assert ds.SegmentationType == "FRACTIONAL"
    assert ds.SegmentationFractionalType == "PROBABILITY"
    got = _masks_by_instance(seg_obj.data, ct, [1])[..., 0]
    assert got.dtype.kind == "f"
    assert np.allclose(got, finding.probability, atol=1 / 255 + 1e-6)
    assert got.max() > 0.9 and 0 < got[got > 0].min() < 0.5  # really fractional, not binarised


def test_no_seg_without_masks(ct) -> None:
    """Policy: no segment without voxels; no SEG when no finding has any (the SR still reports)."""
    without_mask = sphere_finding(ct, (5, 32, 32), 4.0)
    without_mask.mask = None
    empty_mask = sphere_finding(ct, (2, 10, 10), 3.0)
    empty_mask.mask = np.zeros(ct.shape, dtype=bool)
    kinds = [o.kind for o in encode_results(ct, detection(ct, [without_mask, empty_mask]), job_for(ct))]
    assert kinds == [KIND_SR]
    assert [o.kind for o in encode_results(ct, detection(ct, []), job_for(ct))] == [KIND_SR]

    # with one usable mask among them, the SEG has that one segment, tracked as finding 3
    good = sphere_finding(ct, (6, 40, 40), 3.0)
    job = job_for(ct)
    objects = _by_kind(encode_results(ct, detection(ct, [without_mask, empty_mask, good]), job))
    ds = read(objects[KIND_SEG].data)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Nodule 3"]
    assert ds.SegmentSequence[0].TrackingUID == tracking_uid(job, 2)


def test_seg_names_the_model_and_node(ct) -> None:
    finding = sphere_finding(ct, (5, 32, 32), 4.0)
    model = model_info("2.0.1", weights="ab" * 32)
    ds = read(_by_kind(encode_results(ct, detection(ct, [finding], model), job_for(ct, model)))[KIND_SEG].data)
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions) == ("dicom-node", "lung-nodules", "2.0.1")
    assert ds.SeriesDescription == "AI: lung-nodules (v2.0.1) segmentation"
    assert ds.ContentLabel == "AI_RESULT"
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "ab" * 32 in str(algo.AlgorithmParameters)
    # content date/time come from the job, not from the clock
    assert (ds.ContentDate, ds.ContentTime, ds.SeriesDate, ds.InstanceCreationDate) == (
        "20261129", "101530", "20261129", "20261129"
    )


def test_seg_and_sr_on_a_multiframe_source(tmp_path: Path) -> None:
    """An enhanced (multi-frame) CT: SEG frames and the SR box reference source *frames*."""
    import pydicom

    paths = dicomgen.ct_series(tmp_path / "ct", slices=8, size=64)
    legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(), instance_number=1,
    )
    legacy.save_as(tmp_path / "enhanced.dcm")
    volume = load_volume([tmp_path / "enhanced.dcm"])
    frames = [s.frame_number for s in volume.slices]
    assert None not in frames and len({s.sop_instance_uid for s in volume.slices}) == 1
    finding = sphere_finding(volume, (3, 32, 32), 3.0)
    objects = _by_kind(encode_results(volume, detection(volume, [finding]), job_for(volume)))
    for obj in objects.values():
        assert dciodvfy_errors(obj.data) == [], obj.kind

    seg = hd.seg.segread(io.BytesIO(objects[KIND_SEG].data))
    got = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=volume.slices[0].sop_instance_uid,
        source_frame_numbers=frames,
        assert_missing_frames_are_empty=True,
    )
    assert np.array_equal(got[..., 0].astype(bool), finding.mask)
    sr = hd.sr.srread(io.BytesIO(objects[KIND_SR].data))
    ref = sr.content.get_planar_roi_measurement_groups()[0].roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == volume.slices[0].sop_instance_uid
    assert int(ref.ReferencedFrameNumber) == frames[finding.key_slice]


def test_patient_identity_and_character_set_carry_over(tmp_path: Path) -> None:
    import pydicom

    paths = dicomgen.ct_series(tmp_path / "ct", slices=6, size=64)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "Müller^Jürgen"
        ds.save_as(p)
    volume = load_volume(paths)
    objects = encode_results(volume, detection(volume, [sphere_finding(volume, (3, 32, 32), 3.0)]), job_for(volume))
    for obj in objects:
        ds = read(obj.data)
        assert (ds.SpecificCharacterSet, str(ds.PatientName), ds.PatientID) == (
            "ISO_IR 192", "Müller^Jürgen", dicomgen.CANARY_ID
        )
        assert dciodvfy_errors(obj.data) == [], obj.kind


@pytest.mark.parametrize("charset", ["ISO_IR 999", "ISO 2022 IR 100", ""])
def test_a_character_set_highdicom_refuses_does_not_fail_the_seg(tmp_path: Path, charset: str) -> None:
    """An unknown, a lone code-extension or an empty Specific Character Set in the source: the SEG
    (and SR) are still built, with text readable and dciodvfy-clean."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    paths = dicomgen.ct_series(tmp_path / "ct", slices=6, size=64)
    description = Tag(0x00081030)  # Study Description, Latin-1 bytes
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SpecificCharacterSet = charset
        ds.save_as(p)
        ds = pydicom.dcmread(p)
        ds._dict[description] = RawDataElement(description, "LO", 6, b"M\xfcller", 0, False, True)
        ds.save_as(p)
    volume = load_volume(paths)
    objects = _by_kind(encode_results(volume, detection(volume, [sphere_finding(volume, (3, 32, 32), 3.0)]), job_for(volume)))
    assert set(objects) == {KIND_SR, KIND_SEG}
    for obj in objects.values():
        ds = read(obj.data)
        assert str(ds.PatientName) == dicomgen.CANARY_NAME and ds.PatientID == dicomgen.CANARY_ID
        if charset == "ISO 2022 IR 100":  # Latin-1 after all: kept, written as UTF-8
            assert (ds.SpecificCharacterSet, ds.StudyDescription) == ("ISO_IR 192", "Müller")
        else:  # not decodable with certainty: left out
            assert "StudyDescription" not in ds
        assert dciodvfy_errors(obj.data) == [], obj.kind
