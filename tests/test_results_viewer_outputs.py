"""Results every viewer can show (issue 16, item 4): Secondary Capture key images with the box
and an "AI result - not verified" banner burned in, a Grayscale Softcopy Presentation State
drawing the boxes on the source images, and a Key Object Selection "Of Interest" flagging them.

Each object is encoded from a generated CT with findings of known geometry, read back (pixels,
graphic coordinates, references), validated by dciodvfy (zero errors), encoded twice to the same
bytes, and refused by the conformance gate once broken. Which objects each destination gets is
its ``outputs`` setting; the end-to-end test runs a real node, worker, Orthanc (all outputs),
DCMTK storescp (default outputs) and OHIF in headless Chromium.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage

from dicom_node.delivery.outputs import requested_kinds, sends
from dicom_node.errors import ConformanceError
from dicom_node.jobs import ResultRef
from dicom_node.settings import DestinationSettings, Settings
from dicom_node.state import JobState
from tests import dicomgen
from tests.peers import Orthanc, RedisServer, StoreSCP
from tests.pipeline_env import DEFAULT_CONFIG, NodeEnv
from tests.resultdata import detection, job_for, load_volume, read, sphere_finding
from tests.viewer.assets import ohif_dist, playwright_core
from tests.viewer.browser import Browser
from tests.viewer.serve_ohif import OhifServer
from workers.results import (
    KIND_GSPS,
    KIND_KEY_IMAGES,
    KIND_KOS,
    KIND_SC,
    KIND_SEG,
    KIND_SR,
    EncodedObject,
    EncodeOptions,
    SourceFacts,
    check_object,
    encode_results,
    expected_identities,
    load_results,
    object_problems,
    write_results,
)
from workers.results.conformance import dciodvfy_available, run_dciodvfy
from workers.results.key_slices import MAX_KEY_IMAGES
from workers.results.sc import BOX_COLOUR

pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

ALL = frozenset({KIND_SC, KIND_GSPS, KIND_KEY_IMAGES})
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


SCREENSHOTS = (
    Path(os.environ["DICOM_NODE_SCREENSHOTS"]) if os.environ.get("DICOM_NODE_SCREENSHOTS") else None
)
"""A folder the OHIF screenshot of the SC is copied to (e.g. docs/screenshots), when set (read
at import: the suite's fixtures clear every DICOM_NODE_* variable)."""


def _require_dciodvfy() -> None:
    if not dciodvfy_available():
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools)")


@pytest.fixture
def ct(tmp_path: Path):
    paths = dicomgen.ct_series(tmp_path / "ct", slices=10, size=64, pixel_spacing=0.8, slice_thickness=2.0)
    return load_volume(paths)


@pytest.fixture
def findings(ct):
    return [sphere_finding(ct, (3, 20, 20), 3.0), sphere_finding(ct, (6, 40, 44), 4.0, confidence=0.55)]


def _encode(ct, findings, job=None, extra=ALL, **options: Any) -> list[EncodedObject]:
    job = job or job_for(ct)
    return encode_results(ct, detection(ct, findings, job.model), job, EncodeOptions(extra_outputs=extra, **options))


def _kinds(objects: list[EncodedObject]) -> list[str]:
    return [o.kind for o in objects]


# -- what is made -------------------------------------------------------------------------------


def test_outputs_come_in_order_one_sc_per_finding(ct, findings) -> None:
    objects = _encode(ct, findings)
    assert _kinds(objects) == [KIND_SR, KIND_SEG, KIND_SC, KIND_SC, KIND_GSPS, KIND_KEY_IMAGES]
    scs = [o for o in objects if o.kind == KIND_SC]
    assert [o.number for o in scs] == [1, 2] and [o.filename for o in scs] == ["sc.dcm", "sc-2.dcm"]
    assert len({o.series_instance_uid for o in scs}) == 1 and len({o.sop_instance_uid for o in scs}) == 2
    assert [o.sop_class_uid for o in objects[2:]] == [SC_CLASS, SC_CLASS, GSPS_CLASS, KOS_CLASS]
    # The default (what every destination got before) is unchanged: SR and SEG only, same bytes.
    default = encode_results(ct, detection(ct, findings), job_for(ct))
    assert _kinds(default) == [KIND_SR, KIND_SEG]
    assert [o.data for o in default] == [o.data for o in objects[:2]]


def test_no_findings_no_viewer_outputs(ct) -> None:
    assert _kinds(_encode(ct, [])) == [KIND_SR]


def test_sc_is_capped_to_the_most_confident_findings(ct) -> None:
    many = [
        sphere_finding(ct, (k % 10, 12 + 4 * (n % 10), 12 + 4 * (n // 10)), 1.0, confidence=0.3 + n / 100)
        for n, k in enumerate(range(MAX_KEY_IMAGES + 3))
    ]
    objects = _encode(ct, many, extra=frozenset({KIND_SC}))
    scs = [o for o in objects if o.kind == KIND_SC]
    assert len(scs) == MAX_KEY_IMAGES
    # the three least confident (the first three) are left out
    assert "finding 4," in str(scs[0].dataset.DerivationDescription)


def test_unknown_extra_output_is_refused(ct, findings) -> None:
    with pytest.raises(ValueError, match="extra_outputs"):
        _encode(ct, findings, extra=frozenset({"pdf"}))


# -- SC ----------------------------------------------------------------------------------------


def test_sc_burns_in_banner_and_box(ct, findings) -> None:
    objects = _encode(ct, findings, extra=frozenset({KIND_SC}))
    first = next(o for o in objects if o.kind == KIND_SC)
    ds = first.dataset
    src = pydicom.dcmread(ct.slices[findings[0].key_slice].path)
    assert ds.SOPClassUID == SC_CLASS and ds.BurnedInAnnotation == "YES"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyID", "StudyDate", "AccessionNumber"):
        assert ds.get(keyword) == src.get(keyword), keyword
    assert ds.SeriesDescription == "AI: lung-nodules (v1.2.0) key images, not verified"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    algorithm = ds.ContributingEquipmentSequence[0]
    assert (algorithm.ManufacturerModelName, algorithm.SoftwareVersions) == ("lung-nodules", "1.2.0")

    rgb = ds.pixel_array.astype(np.int16)
    scale = 512 // 64
    grey = rgb[..., 0] == rgb[..., 1]
    # a banner above the image (added rows): black, with white text in it
    banner_rows = rgb.shape[0] - 64 * scale
    assert banner_rows > 20 and rgb.shape[1] == 64 * scale
    top = rgb[:banner_rows]
    white = (top == 255).all(axis=-1)
    black = (top == 0).all(axis=-1)
    assert white.sum() > 300 and (white | black).all(), "banner: white text on black"
    text_rows = np.nonzero(white.any(axis=1))[0]
    assert text_rows.max() - text_rows.min() > 20  # two lines, enlarged
    # the box: yellow pixels on the finding's box edges (scaled into the image, below the banner)
    c0, r0, c1, r1 = (v * scale for v in findings[0].bbox_2d)
    yellow = (rgb[..., 0] == BOX_COLOUR[0]) & (rgb[..., 1] == BOX_COLOUR[1]) & (rgb[..., 2] == BOX_COLOUR[2])
    t = 2
    edges = [
        yellow[banner_rows + int(r0) - t : banner_rows + int(r0), int(c0) : int(c1)],
        yellow[banner_rows + int(r1) : banner_rows + int(r1) + t, int(c0) : int(c1)],
        yellow[banner_rows + int(r0) : banner_rows + int(r1), int(c0) - t : int(c0)],
        yellow[banner_rows + int(r0) : banner_rows + int(r1), int(c1) : int(c1) + t],
    ]
    assert all(edge.all() for edge in edges), "box frame not where the finding's box is"
    inside = yellow[banner_rows + int(r0) : banner_rows + int(r1), int(c0) : int(c1)]
    assert not inside.any(), "the frame must not cover the finding"
    assert grey[banner_rows:][~yellow[banner_rows:]].all()  # the rest stays grey


def test_sc_pixels_are_the_lung_window_of_the_key_slice(ct, findings) -> None:
    objects = _encode(ct, findings, extra=frozenset({KIND_SC}))
    ds = next(o for o in objects if o.kind == KIND_SC).dataset
    rgb = ds.pixel_array
    scale = 512 // 64
    hu = ct.array[findings[0].key_slice]
    expected = np.clip(np.floor((hu - (-600 - 750)) * 255 / 1500 + 0.5), 0, 255).astype(np.uint8)
    banner_rows = rgb.shape[0] - 64 * scale
    image = rgb[banner_rows:, :, 0]
    # a corner far from the box and its label
    assert np.array_equal(image[-8 * scale :, -8 * scale :: scale][::scale], expected[-8:, -8:])


# -- GSPS --------------------------------------------------------------------------------------


def test_gsps_draws_each_box_on_its_key_image(ct, findings) -> None:
    objects = _encode(ct, findings, extra=frozenset({KIND_GSPS}))
    gsps_obj = next(o for o in objects if o.kind == KIND_GSPS)
    ds = gsps_obj.dataset
    assert ds.SOPClassUID == GSPS_CLASS and ds.Modality == "PR"
    assert ds.PatientID == read(objects[0].data).PatientID
    assert ds.StudyInstanceUID == ct.study_instance_uid
    voi = ds.SoftcopyVOILUTSequence[0]
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (-600.0, 1500.0)
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.series_instance_uid
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedImageSequence} == {s.sop_instance_uid for s in ct.slices}
    annotations = list(ds.GraphicAnnotationSequence)
    assert len(annotations) == len(findings)
    sr = hd.sr.srread(io.BytesIO(objects[0].data))
    for finding, annotation in zip(findings, annotations, strict=True):
        (image,) = annotation.ReferencedImageSequence
        assert image.ReferencedSOPInstanceUID == ct.slices[finding.key_slice].sop_instance_uid
        (box,) = annotation.GraphicObjectSequence
        c0, r0, c1, r1 = finding.bbox_2d
        assert (box.GraphicType, box.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
        assert np.allclose(np.reshape(box.GraphicData, (-1, 2)), [[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]])
        assert annotation.TextObjectSequence[0].UnformattedTextValue.startswith("AI ")
    # the same Tracking UIDs as the SR's measurement groups
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [str(a.GraphicObjectSequence[0].TrackingUID) for a in annotations] == [str(g.tracking_uid) for g in groups]


# -- key image note ------------------------------------------------------------------------------


def test_key_image_note_flags_key_slices_and_the_derived_objects(ct, findings) -> None:
    objects = _encode(ct, findings)
    note = next(o for o in objects if o.kind == KIND_KEY_IMAGES)
    ds = note.dataset
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("113000", "DCM", "Of Interest")
    flagged = {
        r.ReferencedSOPInstanceUID
        for item in ds.ContentSequence
        if item.ValueType in ("IMAGE", "COMPOSITE")
        for r in item.ReferencedSOPSequence
    }
    keys = {ct.slices[f.key_slice].sop_instance_uid for f in findings}
    derived = {o.sop_instance_uid for o in objects if o.kind in (KIND_SC, KIND_GSPS)}
    assert flagged == keys | derived
    doc = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    assert doc.PatientID == read(objects[0].data).PatientID
    # Without SC and GSPS asked for, it flags the key source images only, under another UID.
    alone = next(o for o in _encode(ct, findings, extra=frozenset({KIND_KEY_IMAGES})) if o.kind == KIND_KEY_IMAGES)
    assert alone.sop_instance_uid != note.sop_instance_uid
    assert {
        r.ReferencedSOPInstanceUID for item in alone.dataset.ContentSequence
        if item.ValueType == "IMAGE" for r in item.ReferencedSOPSequence
    } == keys


# -- every object: dciodvfy, determinism, gate --------------------------------------------------------


def test_every_viewer_output_passes_dciodvfy(ct, findings) -> None:
    _require_dciodvfy()
    for obj in _encode(ct, findings):
        report = run_dciodvfy(obj.data)
        assert report.errors == [], (obj.filename, report.errors)


def test_same_job_gives_the_same_bytes(ct, findings, tmp_path: Path) -> None:
    first = _encode(ct, findings)
    time.sleep(1.1)  # a clock read anywhere in encoding would now show up in the bytes
    second = _encode(ct, findings, job=job_for(ct, job_id="job-2"))
    assert [o.data for o in first] == [o.data for o in second]
    paths = write_results(first, tmp_path / "out")
    assert [p.name for p in paths] == ["sr.dcm", "seg.dcm", "sc.dcm", "sc-2.dcm", "gsps.dcm", "key-images.dcm"]
    assert [o.data for o in load_results(tmp_path / "out")] == [o.data for o in first]


def test_the_gate_refuses_broken_viewer_outputs(ct, findings) -> None:
    job = job_for(ct)
    objects = _encode(ct, findings, job=job)
    facts = SourceFacts.from_volume(ct, job)
    ids = expected_identities(job, EncodeOptions(extra_outputs=ALL))
    for obj in objects:
        assert object_problems(obj, facts, job, expected=ids[obj.kind].instance(obj.number)) == [], obj.filename

    def broken(obj: EncodedObject, change) -> EncodedObject:
        ds = copy.deepcopy(obj.dataset)
        change(ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return EncodedObject.from_bytes(obj.kind, buf.getvalue(), obj.number)

    sc, sc2, gsps, note = objects[2], objects[3], objects[4], objects[5]
    other_study = broken(sc, lambda ds: setattr(ds, "StudyInstanceUID", "1.2.3.4"))
    with pytest.raises(ConformanceError, match="sc: Study Instance UID differs from the source study"):
        check_object(other_study, facts, job, expected=ids[KIND_SC])
    problems = object_problems(broken(sc, lambda ds: setattr(ds, "BurnedInAnnotation", "NO")), facts, job)
    assert "sc: Burned In Annotation is not YES (the image carries burned-in text)" in problems
    # the second image stored as if it were the first: wrong UID for instance 1, wrong number
    swapped = EncodedObject.from_bytes(KIND_SC, sc2.data, 1)
    problems = object_problems(swapped, facts, job, expected=ids[KIND_SC].instance(1))
    assert "sc: SOP Instance UID is not the job's deterministic UID" in problems
    assert "sc: Instance Number differs from the stored instance's number" in problems

    def move_box(ds: pydicom.Dataset) -> None:
        ds.GraphicAnnotationSequence[0].GraphicObjectSequence[0].GraphicData = [1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]
    assert "gsps: annotation 1 has no closed POLYLINE box in PIXEL units" in object_problems(broken(gsps, move_box), facts, job)

    def foreign_image(ds: pydicom.Dataset) -> None:
        ds.GraphicAnnotationSequence[1].ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4.5"
    assert "gsps: annotation 2 is not drawn on images of the source series" in object_problems(
        broken(gsps, foreign_image), facts, job
    )
    rejection_title = broken(note, lambda ds: setattr(ds.ConceptNameCodeSequence[0], "CodeValue", "113001"))
    assert "key-images: title is not (113000, DCM) 'Of Interest' (CID 7010)" in object_problems(rejection_title, facts, job)
    other_patient = broken(gsps, lambda ds: setattr(ds, "PatientID", "SOMEONE-ELSE"))
    assert "gsps: Patient ID differs from the source images" in object_problems(other_patient, facts, job)


def test_the_rejection_note_of_version_2_withdraws_the_viewer_outputs_of_version_1(ct, findings) -> None:
    _require_dciodvfy()
    job1 = job_for(ct)
    v1 = _encode(ct, findings, job=job1)
    refs = tuple(ResultRef(o.kind, o.sop_class_uid, o.series_instance_uid, o.sop_instance_uid) for o in v1)
    job2 = dataclasses.replace(job_for(ct, input_hash="1" * 64), result_version=2, superseded=refs)
    v2 = _encode(ct, findings, job=job2)
    assert _kinds(v2)[-1] == KIND_KOS
    kos = v2[-1].dataset
    evidence = {
        r.ReferencedSOPInstanceUID
        for study in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for r in series.ReferencedSOPSequence
    }
    assert evidence == {o.sop_instance_uid for o in v1}
    assert len(evidence) == 6
    assert run_dciodvfy(v2[-1].data).errors == []
    assert [read(o.data).SeriesNumber for o in v2[2:6]] == [9015, 9015, 9016, 9017]


def test_viewer_outputs_on_a_multiframe_source(tmp_path: Path) -> None:
    """An enhanced (multi-frame) CT: the SC, the GSPS annotation and its key image name the frame."""
    _require_dciodvfy()
    paths = dicomgen.ct_series(tmp_path / "ct", slices=8, size=64)
    legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=hd.UID(), series_number=3, sop_instance_uid=hd.UID(), instance_number=1,
    )
    legacy.save_as(tmp_path / "enhanced.dcm")
    volume = load_volume([tmp_path / "enhanced.dcm"])
    finding = sphere_finding(volume, (3, 32, 32), 3.0)
    frame = volume.slices[finding.key_slice].frame_number
    assert frame is not None
    objects = {o.kind: o for o in _encode(volume, [finding])}
    assert set(objects) == {KIND_SR, KIND_SEG, KIND_SC, KIND_GSPS, KIND_KEY_IMAGES}
    for obj in objects.values():
        assert run_dciodvfy(obj.data).errors == [], obj.kind
    source = objects[KIND_SC].dataset.SourceImageSequence[0]
    assert (source.ReferencedSOPInstanceUID, int(source.ReferencedFrameNumber)) == (volume.slices[0].sop_instance_uid, frame)
    annotation = objects[KIND_GSPS].dataset.GraphicAnnotationSequence[0]
    assert int(annotation.ReferencedImageSequence[0].ReferencedFrameNumber) == frame


# -- settings and delivery selection -----------------------------------------------------------------


def test_destination_outputs_setting() -> None:
    default = DestinationSettings(url="dicom://PACS@127.0.0.1:104")
    assert default.outputs == ["sr", "seg"]
    kinds = ["sr", "sr-volumetric", "seg", "sc", "gsps", "key-images", "kos"]
    assert [k for k in kinds if sends(default, k)] == ["sr", "sr-volumetric", "seg", "kos"]
    plain = DestinationSettings(url="dicom://PACS@127.0.0.1:104", outputs="sr, sc,kos", supersede="none")  # type: ignore[arg-type]
    assert plain.outputs == ["sr", "sc", "kos"]
    assert [k for k in kinds if sends(plain, k)] == ["sr", "sr-volumetric", "sc", "key-images"]
    with pytest.raises(ValidationError, match=r"outputs: unknown value\(s\) 'pdf'; choose from sr, seg, sc, gsps, kos"):
        DestinationSettings(url="dicom://PACS@127.0.0.1:104", outputs=["sr", "pdf"])
    with pytest.raises(ValidationError, match="at least one"):
        DestinationSettings(url="dicom://PACS@127.0.0.1:104", outputs=[])


def test_a_job_encodes_what_its_destinations_ask_for(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path,
            "destinations": {
                "ohif": {"url": "http://127.0.0.1:8042/dicom-web"},
                "pacs": {"url": "dicom://PACS@127.0.0.1:104", "outputs": ["sr", "sc", "kos"]},
            },
        }
    )
    assert requested_kinds(settings, ["ohif"]) == frozenset()
    assert requested_kinds(settings, ["ohif", "pacs"]) == {"sc", "key-images"}
    # a destination this process does not know could want anything
    assert requested_kinds(settings, ["elsewhere"]) == {"sc", "gsps", "key-images"}


# -- end to end: node, worker, Orthanc (all outputs), storescp (default), OHIF -----------------------


def _toml(entries: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in entries.items())


def _fetch(pacs: Orthanc, sop_instance_uid: str) -> bytes:
    (found,) = pacs.post("/tools/lookup", data=sop_instance_uid).json()
    return pacs.get(f"/instances/{found['ID']}/file").content


def _image_to_screen(browser: Browser, points_xy: np.ndarray) -> np.ndarray:
    """Page pixel coordinates of image pixel centres (column, row) of the displayed image."""
    pts = [[float(x), float(y)] for x, y in points_xy]
    out = browser.eval(
        f"""(() => {{ const vp = {VIEWPORT}; const d = vp.getImageData(); const r = vp.canvas.getBoundingClientRect();
        return {pts}.map(p => {{ const w = d.imageData.indexToWorld([p[0], p[1], 0]); const c = vp.worldToCanvas(w);
        return [c[0] + r.left, c[1] + r.top]; }}); }})()"""
    )
    return np.asarray(out, dtype=np.float64)


def _sample(rgb: np.ndarray, points: np.ndarray) -> np.ndarray:
    xs = np.clip(np.round(points[:, 0]).astype(int), 0, rgb.shape[1] - 1)
    ys = np.clip(np.round(points[:, 1]).astype(int), 0, rgb.shape[0] - 1)
    return rgb[ys, xs].astype(np.int16)


def _pick(mask: np.ndarray, count: int = 150) -> np.ndarray:
    """Up to ``count`` (column, row) points spread over ``mask`` (eroded, so a sampled screen
    pixel falls well inside a stroke whatever the zoom)."""
    inner = ndimage.binary_erosion(mask, iterations=1)
    rows, cols = np.nonzero(inner if inner.any() else mask)
    step = max(1, len(rows) // count)
    return np.stack([cols[::step], rows[::step]], 1)


VIEWPORT = "window.cornerstone.getRenderingEngines()[0].getViewports()[0]"


def _shows(fragment: str) -> str:
    """A JavaScript test that OHIF's first viewport shows an image whose WADO-RS id contains ``fragment``."""
    return f"(() => {{ try {{ return {VIEWPORT}.getCurrentImageId().includes('{fragment}'); }} catch (e) {{ return false; }} }})()"


@pytest.mark.slow
@pytest.mark.viewer
@pytest.mark.timeout(500)
def test_each_destination_gets_its_outputs_and_ohif_shows_the_key_image(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer, clean_orthanc: Orthanc
) -> None:
    _require_dciodvfy()
    pacs = clean_orthanc
    archive = StoreSCP(tmp_path / "storescp").start()
    config = (
        DEFAULT_CONFIG.format(seconds=0.0)
        + "\n[destinations.pacs]\n"
        + _toml({"url": pacs.dicomweb_url_with_credentials, "outputs": ["sr", "seg", "sc", "gsps", "kos"]})
        + "\n[destinations.archive]\n"
        + _toml({"url": f"dicom://{archive.aet}@127.0.0.1:{archive.port}"})
    )
    env = NodeEnv(tmp_path / "node", sqlite_url, broker_url=redis_server.url, config_text=config)
    env.start()
    try:
        env.add_worker()
        study = dicomgen.ct_series(tmp_path / "ct", slices=8, size=128, pixel_spacing=1.0, slice_thickness=2.5)
        sources = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in study}
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        pacs.upload(study)  # the PACS holds the study it routes to the node
        env.send(study)
        (job,) = env.wait_all_terminal(1)
        assert job.state == JobState.DONE.value, env.diagnostics()
        outputs = {(o.kind, str(o.sop_instance_uid)) for o in env.outputs(job.id) if o.kind != "summary"}
        assert sorted(k for k, _ in outputs) == ["gsps", "key-images", "sc", "seg", "sr"]
        uid = {kind: sop for kind, sop in outputs}

        # Orthanc (outputs = all): every object, read back and parsed.
        held = {i["00080018"]["Value"][0]: i["00080016"]["Value"][0] for i in pacs.instances_in_study(study_uid)}
        assert set(held) == set(sources) | set(uid.values())
        sc_bytes = _fetch(pacs, uid["sc"])
        sc = hd.imread(io.BytesIO(sc_bytes))
        assert (sc.SOPClassUID, sc.BurnedInAnnotation, sc.PhotometricInterpretation) == (SC_CLASS, "YES", "RGB")
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources
        gsps = pydicom.dcmread(io.BytesIO(_fetch(pacs, uid["gsps"])))
        (annotation,) = gsps.GraphicAnnotationSequence
        key_uid = annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        assert key_uid == sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        note = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(io.BytesIO(_fetch(pacs, uid["key-images"]))))
        flagged = {
            r.ReferencedSOPInstanceUID
            for item in note.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")
            for r in item.ReferencedSOPSequence
        }
        assert flagged == {key_uid, uid["sc"], uid["gsps"]}
        for kind in ("sc", "gsps", "key-images"):
            assert run_dciodvfy(_fetch(pacs, uid[kind])).errors == [], kind

        # storescp (default outputs): only the SR and the SEG.
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in archive.received}
        assert received == {uid["sr"], uid["seg"]}
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()
        archive.stop()

    # OHIF: the SC series shows the banner's white text on black and the yellow box.
    pixels = sc.pixel_array
    white = (pixels == 255).all(axis=-1)
    black = (pixels == 0).all(axis=-1)
    yellow = (pixels[..., 0] == BOX_COLOUR[0]) & (pixels[..., 1] == BOX_COLOUR[1]) & (pixels[..., 2] == BOX_COLOUR[2])
    banner_rows = pixels.shape[0] - pixels.shape[1]  # rows added above the (square) image
    text = _pick(white[:banner_rows])
    dark = _pick(black[:banner_rows] & ~ndimage.binary_dilation(white[:banner_rows], iterations=3))
    box = _pick(yellow)
    assert len(text) > 50 and len(dark) > 50 and len(box) > 50
    ct_series = str(pydicom.dcmread(study[0], stop_before_pixels=True).SeriesInstanceUID)
    playwright_core()
    server = OhifServer(ohif_dist(), pacs.url, *pacs.auth).start()
    browser = Browser(width=1400, height=900)
    try:
        browser.goto(f"{server.url}/viewer?StudyInstanceUIDs={study_uid}")
        item = '[data-cy="study-browser-thumbnail"][data-series="9005"]'
        browser.wait(item, timeout_ms=120000)
        # As a user does: the study opens on its CT first, then the key image is double-clicked.
        # A double-click before OHIF's first display lands can be overridden by that display (the
        # viewport then shows the CT again).
        browser.wait_for(_shows(f"/series/{ct_series}/"), 120000)
        browser.call("dblclick", selector=item)
        browser.wait_for(_shows(f"/instances/{uid['sc']}/"), 60000)
        shots = tmp_path / "screenshots"
        shots.mkdir()
        # A loaded machine can take a while to paint; OHIF may open its cine player over the
        # top of the image (where the banner is), so it is closed whenever it shows.
        deadline = time.monotonic() + 90
        while True:
            browser.eval("""(() => { const x = document.querySelector('[data-cy="cine-player-close"]');
                if (x) { x.click(); } return true; })()""")
            rgb = np.asarray(Image.open(browser.screenshot(shots / "sc.png")).convert("RGB"))
            on_text = _sample(rgb, _image_to_screen(browser, text))
            on_dark = _sample(rgb, _image_to_screen(browser, dark))
            on_box = _sample(rgb, _image_to_screen(browser, box))
            bright = (on_text.min(axis=1) > 200).mean()
            unlit = (on_dark.max(axis=1) < 60).mean()
            boxed = ((on_box[:, 0] > 180) & (on_box[:, 1] > 150) & (on_box[:, 2] < 100)).mean()
            if (bright > 0.8 and unlit > 0.8 and boxed > 0.8) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        shown = browser.eval(f"(() => {{ try {{ return {VIEWPORT}.getCurrentImageId(); }} catch (e) {{ return String(e); }} }})()")
        assert bright > 0.8, f"banner text not shown ({bright:.0%} of its pixels bright; the viewport shows {shown})"
        assert unlit > 0.8, f"banner background not shown ({unlit:.0%} dark)"
        assert boxed > 0.8, f"box not shown ({boxed:.0%} of its pixels yellow)"
        if SCREENSHOTS is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shots / "sc.png", SCREENSHOTS / "ohif-sc-key-image.png")
    finally:
        browser.close()
        server.stop()


@pytest.mark.slow
def test_delete_policy_withdraws_the_viewer_outputs_of_the_superseded_version(
    tmp_path: Path, sqlite_url: str, redis_server: RedisServer, clean_orthanc: Orthanc
) -> None:
    """A late instance makes version 2; with ``supersede = "delete"`` Orthanc keeps only version
    2's objects, the SC key images, GSPS and key image note of version 1 included."""
    pacs = clean_orthanc
    config = DEFAULT_CONFIG.format(seconds=0.0) + "\n[destinations.pacs]\n" + _toml(
        {"url": pacs.dicomweb_url_with_credentials, "supersede": "delete", "outputs": ["sr", "sc", "gsps", "kos"]}
    )
    env = NodeEnv(tmp_path / "node", sqlite_url, broker_url=redis_server.url, config_text=config)
    env.start()
    try:
        env.add_worker()
        study = dicomgen.ct_series(tmp_path / "ct", slices=8, size=64)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)
        env.send(study[:7])
        (v1_job,) = env.wait_all_terminal(1)
        assert v1_job.state == JobState.DONE.value, env.diagnostics()
        v1 = {str(o.sop_instance_uid): o.kind for o in env.outputs(v1_job.id) if o.kind != "summary"}
        held = {i["00080018"]["Value"][0] for i in pacs.instances_in_study(study_uid)}
        assert sorted(v1.values()) == ["gsps", "key-images", "sc", "seg", "sr"]
        assert held == {uid for uid, kind in v1.items() if kind != "seg"}  # outputs leave the SEG out

        env.send(study[7:])
        jobs = env.wait_all_terminal(2)
        assert [j.state for j in jobs] == [JobState.DONE.value] * 2, env.diagnostics()
        v2 = {str(o.sop_instance_uid): o.kind for o in env.outputs(jobs[1].id) if o.kind != "summary"}
        assert sorted(v2.values()) == ["gsps", "key-images", "kos", "sc", "seg", "sr"]
        held = {i["00080018"]["Value"][0] for i in pacs.instances_in_study(study_uid)}
        assert held == {uid for uid, kind in v2.items() if kind not in ("seg", "kos")}
        env.assert_every_complete_study_terminal()
    finally:
        env.stop()
