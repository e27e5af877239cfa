"""Evaluation on real-data formats: LIDC-IDRI (DICOM + LIDC XML readings, the LUNA16 rule),
LUNA16 (``.mhd``/``.raw`` + CSV files) and the real chest CT ``truth.json`` files; FROC, CPM and
bootstrap intervals with known numbers; a picture per false finding and per miss.

The LIDC and LUNA16 studies are written here from one phantom (same pixels, same geometry), so
the detector must find the same things in both."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicom_node.synth import PhantomSpec, make_phantom
from dicom_node.synth.series import write_series
from dicom_node.uids import derive_uid
from workers.evaluate import (
    FALSE,
    IGNORED,
    Candidate,
    ScanResult,
    bootstrap_froc,
    cpm,
    find_references,
    froc,
    match,
    operating_point,
)
from workers.evaluate.lidc import read_lidc
from workers.evaluate.luna16 import load_mhd, read_luna16
from workers.evaluate.pictures import SIZE_PX, draw_scan
from workers.models.base import InputRequirements

SPEC = PhantomSpec(
    seed=5, slices=96, matrix=448, pixel_spacing=0.8, slice_thickness=1.25, nodules=3,
    nodule_types=("solid",), min_diameter=7, max_diameter=10, noise_hu=20.0,
)  # fmt: skip
"""Within the range the detector's card declares as validated (0.6-0.8 mm pixels, whole lungs
in the field of view), so its input check lets it through."""
SMALL_MARK = (0.0, -20.0, 0.0)
NON_NODULE = (-60.0, 20.0, 10.0)
EMPTY = {"center_mm": [-80.0, -30.0, -10.0], "diameter_mm": 6.0}
"""A "nodule" all four readers outline where the phantom has none: a sure miss."""


# -- writing an LIDC reading -----------------------------------------------------------------


def _outline(cx: float, cy: float, r: float, ipp: np.ndarray, ps: float) -> str:
    """A closed outline (image columns/rows, integers as in LIDC) of a circle in mm."""
    pts = []
    for a in np.linspace(0, 2 * math.pi, 24, endpoint=False):
        col = round((cx + r * math.cos(a) - ipp[0]) / ps)
        row = round((cy + r * math.sin(a) - ipp[1]) / ps)
        pts.append(f"<edgeMap><xCoord>{col}</xCoord><yCoord>{row}</yCoord></edgeMap>")
    return "".join(pts)


def _nodule_xml(
    n_id: str, centre: list[float], d: float, slices: list[tuple[str, np.ndarray]], ps: float
) -> str:
    rois = []
    for sop, ipp in slices:
        dz = abs(float(ipp[2]) - centre[2])
        if dz >= d / 2:
            continue
        r = math.sqrt((d / 2) ** 2 - dz**2)
        rois.append(
            f"<roi><imageZposition>{ipp[2]:.3f}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
            f"<inclusion>TRUE</inclusion>{_outline(centre[0], centre[1], r, ipp, ps)}</roi>"
        )
    chars = "<characteristics><subtlety>4</subtlety><malignancy>3</malignancy></characteristics>"
    return f"<unblindedReadNodule><noduleID>{n_id}</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"


def _nearest(slices: list[tuple[str, np.ndarray]], z: float) -> tuple[str, np.ndarray]:
    return min(slices, key=lambda s: abs(float(s[1][2]) - z))


def _point(
    tag: str, p: tuple[float, float, float], slices: list[tuple[str, np.ndarray]], ps: float
) -> str:
    sop, ipp = _nearest(slices, p[2])
    col, row = round((p[0] - ipp[0]) / ps), round((p[1] - ipp[1]) / ps)
    xy = f"<xCoord>{col}</xCoord><yCoord>{row}</yCoord>"
    where = f"<imageZposition>{ipp[2]:.3f}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
    if tag == "small":
        return (
            f"<unblindedReadNodule><noduleID>small</noduleID><roi>{where}"
            f"<inclusion>TRUE</inclusion><edgeMap>{xy}</edgeMap></roi></unblindedReadNodule>"
        )
    return f"<nonNodule><nonNoduleID>nn</nonNoduleID>{where}<locus>{xy}</locus></nonNodule>"


def lidc_reading(series_uid: str, sessions: list[str]) -> str:
    body = "".join(
        f"<readingSession><annotationVersion>3.12</annotationVersion>"
        f"<servicingRadiologistID>{n}</servicingRadiologistID>{s}</readingSession>"
        for n, s in enumerate(sessions)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<LidcReadMessage xmlns="http://www.nih.gov">'
        f"<ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
        f"{body}</LidcReadMessage>\n"
    )


# -- the study, written once ------------------------------------------------------------------


@dataclass
class Study:
    nodules: list[dict[str, Any]]
    """The phantom's three nodules: A (3 readers), B (2 readers), C (4 readers); and the
    readers mark :data:`EMPTY` (4 readers)."""
    lidc: Path
    luna: Path
    series_uid: str
    luna_uid: str


def _write_luna16(ph: Any, root: Path, uid: str, nodules: list[dict[str, Any]]) -> None:
    sub = root / "subset0"
    sub.mkdir(parents=True)
    # Stored head first (as the DICOM files are), against the +z axis: the reader must flip it.
    (sub / f"{uid}.raw").write_bytes(ph.hu.astype("<i2").tobytes())
    x0, y0, z_top = ph.position(0)
    px, dz = ph.spec.pixel_spacing, ph.spec.slice_thickness
    (sub / f"{uid}.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 -1\n"
        f"Offset = {x0} {y0} {z_top}\nCenterOfRotation = 0 0 0\nAnatomicalOrientation = RAI\n"
        f"ElementSpacing = {px} {px} {dz}\nDimSize = {ph.hu.shape[2]} {ph.hu.shape[1]} {ph.hu.shape[0]}\n"
        f"ElementType = MET_SHORT\nElementDataFile = {uid}.raw\n"
    )
    fields = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    with open(root / "annotations.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        for n in (nodules[0], nodules[2], EMPTY):
            w.writerow([uid, *n["center_mm"], n["diameter_mm"]])
    (root / "evaluationScript" / "annotations").mkdir(parents=True)
    with open(
        root / "evaluationScript" / "annotations" / "annotations_excluded.csv", "w", newline=""
    ) as fh:
        w = csv.writer(fh)
        w.writerow(fields)
        w.writerow([uid, *nodules[1]["center_mm"], nodules[1]["diameter_mm"]])
        w.writerow([uid, *NON_NODULE, -1])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    root = tmp_path_factory.mktemp("real-formats")
    ph = make_phantom(SPEC)
    files = write_series(ph, root / "lidc" / "LIDC-TEST-0001")
    (files.folder / "truth.json").unlink()  # an LIDC folder: DICOM + XML only
    nodules = [n.to_json() for n in ph.nodules]
    slices = []
    for p in files.paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        slices.append(
            (str(ds.SOPInstanceUID), np.array([float(v) for v in ds.ImagePositionPatient]))
        )
    ps = SPEC.pixel_spacing
    a, b, c = nodules
    sessions = []
    for reader in range(4):
        # Each reader outlines a little differently: shifted 0.4 mm, 5 % larger or smaller.
        def mark(n: dict[str, Any], name: str, reader: int = reader) -> str:
            centre = [
                n["center_mm"][0] + 0.4 * (reader - 1.5),
                n["center_mm"][1],
                n["center_mm"][2],
            ]
            return _nodule_xml(
                name, centre, n["diameter_mm"] * (1 + 0.05 * (reader - 1.5)), slices, ps
            )

        marks = [mark(c, "C"), mark(EMPTY, "D")]
        marks += [mark(a, "A")] if reader < 3 else []
        marks += [mark(b, "B")] if reader in (1, 3) else []
        marks += [_point("small", SMALL_MARK, slices, ps)] if reader == 0 else []
        marks += [_point("non-nodule", NON_NODULE, slices, ps)] if reader == 2 else []
        sessions.append("".join(marks))
    (files.folder / "069.xml").write_text(lidc_reading(files.series_instance_uid, sessions))
    luna_uid = derive_uid("test", "luna16", "volume")
    _write_luna16(ph, root / "luna16", luna_uid, nodules)
    return Study(nodules, files.folder, root / "luna16", files.series_instance_uid, luna_uid)


# -- LIDC: the LUNA16 rule ---------------------------------------------------------------------


def test_lidc_reading_follows_the_luna16_rule(study: Study) -> None:
    (ref,) = read_lidc(study.lidc)
    assert ref.kind == "lidc" and ref.name == study.series_uid
    a, b, c = study.nodules
    # Positives: A (3 of 4 readers), C and EMPTY (4 of 4); B (2 readers) is not one.
    assert sorted(p["readers"] for p in ref.positives) == [3, 4, 4]
    for p in ref.positives:
        truth = min(
            (a, c, EMPTY), key=lambda n: np.linalg.norm(np.subtract(p["center_mm"], n["center_mm"]))
        )
        assert truth is not c or p["readers"] == 4
        assert truth is not a or p["readers"] == 3
        assert np.linalg.norm(np.subtract(p["center_mm"], truth["center_mm"])) < 1.0
        assert p["diameter_mm"] == pytest.approx(truth["diameter_mm"], rel=0.2)
    whys = sorted(r["why"] for r in ref.ignore)
    assert whys == [
        "nodule < 3 mm, one reader",
        "nodule marked by 2 of 4 readers",
        "non-nodule mark, one reader",
    ]
    two = next(r for r in ref.ignore if "2 of 4" in r["why"])
    assert np.linalg.norm(np.subtract(two["center_mm"], b["center_mm"])) < 1.0
    assert two["radius_mm"] == pytest.approx(max(b["diameter_mm"] / 2, 5.0), rel=0.2)
    small = next(r for r in ref.ignore if "< 3 mm" in r["why"])
    assert small["radius_mm"] == 5.0
    assert np.linalg.norm(np.subtract(small["center_mm"], SMALL_MARK)) < SPEC.slice_thickness


def test_findings_are_counted_by_the_rule(study: Study) -> None:
    (ref,) = read_lidc(study.lidc)
    a, b, _ = (tuple(n["center_mm"]) for n in study.nodules)
    far = (a[0] + 40.0, a[1], a[2])
    near_small = (SMALL_MARK[0] + 3.0, SMALL_MARK[1], SMALL_MARK[2])
    findings = [
        Candidate(a, 0.9),  # hit on A
        Candidate(b, 0.8),  # on the 2-reader nodule: ignored
        Candidate(near_small, 0.7),  # 3 mm from the < 3 mm mark: ignored
        Candidate(NON_NODULE, 0.6),  # on the non-nodule: ignored
        Candidate(far, 0.5),  # a false positive
    ]
    scan = ScanResult("s", ref.positives, findings, findings, ignore=ref.ignore)
    a_index = next(k for k, p in enumerate(ref.positives) if p["readers"] == 3)
    assert match(scan).tolist() == [a_index, IGNORED, IGNORED, IGNORED, FALSE]
    op = operating_point([scan])
    assert (op["tp"], op["fp"], op["fn"]) == (1, 1, 2)  # C and EMPTY are missed
    f = froc([scan])
    assert f["nodules"] == 3
    assert f["sensitivity_at"]["0.125"] == pytest.approx(1 / 3, abs=1e-4)
    assert f["sensitivity_at"]["1.0"] == pytest.approx(1 / 3, abs=1e-4)
    # Without the ignore regions, the three ignored findings would be false positives.
    bare = ScanResult("s", ref.positives, findings, findings)
    assert operating_point([bare])["fp"] == 4


# -- LUNA16 --------------------------------------------------------------------------------------


def test_luna16_reference_and_volume(study: Study) -> None:
    (ref,) = read_luna16(study.luna)
    assert ref.kind == "luna16" and ref.name == study.luna_uid
    a, b, c = study.nodules
    assert [p["center_mm"] for p in ref.positives] == [
        a["center_mm"],
        c["center_mm"],
        EMPTY["center_mm"],
    ]
    assert [r["radius_mm"] for r in ref.ignore] == [
        pytest.approx(max(b["diameter_mm"] / 2, 5.0), abs=0.01),
        5.0,
    ]
    volume = ref.load(InputRequirements())
    from workers.volume import load_series

    dicom = load_series(sorted(study.lidc.glob("*.dcm")))
    # The same pixels at the same LPS positions as the DICOM series of the phantom.
    assert volume.shape == dicom.shape
    assert np.array_equal(volume.array, dicom.array)
    assert np.allclose(volume.positions, dicom.positions)
    assert np.allclose(volume.affine, dicom.affine)
    for n in study.nodules:
        k, j, i = volume.patient_to_index(*n["center_mm"])
        assert volume.array[round(k), round(j), round(i)] > -300  # inside the solid nodule
        assert np.allclose(volume.index_to_patient(k, j, i), n["center_mm"], atol=1e-6)


def test_luna16_refuses_what_the_model_refuses(study: Study) -> None:
    (ref,) = read_luna16(study.luna)
    from workers.evaluate import SkipScan

    with pytest.raises(SkipScan, match=r"slice spacing 1\.25 mm is above the model's 1 mm"):
        ref.load(InputRequirements(max_slice_thickness_mm=1.0))
    with pytest.raises(SkipScan, match="voxels"):
        load_mhd(next(study.luna.rglob("*.mhd")), max_voxels=1000)


# -- metrics with known numbers --------------------------------------------------------------


def _scan(found: float | None, fps: list[float]) -> ScanResult:
    """One scan with one 10 mm nodule at the origin: a candidate on it scored ``found`` (none
    when None) and false positives 100 mm away with the given scores."""
    cands = [Candidate((100.0 + k, 0.0, 0.0), s) for k, s in enumerate(fps)]
    if found is not None:
        cands.append(Candidate((0.0, 0.0, 0.0), found))
    return ScanResult("s", [{"center_mm": [0.0, 0.0, 0.0], "diameter_mm": 10.0}], cands, [])


def test_cpm_is_the_mean_sensitivity_at_seven_rates() -> None:
    # 4 scans. FPs 0.95, 0.9 (scan 0) rank above every hit; hits at 0.8, 0.6, 0.4; scan 3 missed.
    scans = [_scan(0.8, [0.95, 0.9]), _scan(0.6, []), _scan(0.4, [0.5]), _scan(None, [0.3])]
    f = froc(scans)
    # FP/scan 0.25 at 0.95, 0.5 at 0.9; 0.8 -> 1/4; 0.6 -> 2/4; 0.5 FP -> 0.75; 0.4 -> 3/4; 0.3 -> 1.0
    assert f["sensitivity_at"] == {
        "0.125": 0.0, "0.25": 0.0, "0.5": 0.5, "1.0": 0.75, "2.0": 0.75, "4.0": 0.75, "8.0": 0.75,
    }  # fmt: skip
    assert cpm(scans) == pytest.approx((0.5 + 0.75 * 4) / 7, abs=1e-4)


def test_bootstrap_interval_with_known_numbers() -> None:
    # Two scans: one nodule found without FPs, one missed. Resampled pairs hold 0, 1 or 2 found
    # scans (chance 1/4, 1/2, 1/4): sensitivity 0, 0.5 or 1 -> the 95 % interval is [0, 1].
    scans = [_scan(0.9, []), _scan(None, [])]
    boot = bootstrap_froc(scans, rounds=2000)
    assert boot["sensitivity_at"]["1.0"] == [0.0, 1.0]
    assert boot["cpm"] == [0.0, 1.0]
    # Identical scans: every resample is the same, the interval is the point.
    same = [_scan(0.9, [0.95]), _scan(0.9, [0.95])]
    boot = bootstrap_froc(same, rounds=200)
    point = froc(same)["sensitivity_at"]
    assert all(boot["sensitivity_at"][r] == [v, v] for r, v in point.items())
    assert boot["cpm"] == [cpm(same)] * 2
    # A fixed seed: the same interval on every run.
    varied = [_scan(0.8, [0.95, 0.9]), _scan(0.6, []), _scan(0.4, [0.5]), _scan(None, [0.3])]
    assert bootstrap_froc(varied, rounds=300) == bootstrap_froc(varied, rounds=300)
    lo, hi = bootstrap_froc(varied, rounds=300)["cpm"]
    assert lo < cpm(varied) < hi


# -- pictures ----------------------------------------------------------------------------------


def test_a_picture_per_false_finding_and_per_miss(study: Study, tmp_path: Path) -> None:
    from PIL import Image

    (ref,) = read_luna16(study.luna)
    volume = ref.load(InputRequirements())
    a, _, c = study.nodules
    false = [
        ((a["center_mm"][0] + 40.0, a["center_mm"][1], a["center_mm"][2]), 0.97),
        (NON_NODULE, 0.5),
    ]
    names = draw_scan(volume, 7, false, [c], tmp_path)
    assert names == {
        "false": ["scan007-false-01.png", "scan007-false-02.png"],
        "miss": ["scan007-miss-01.png"],
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names["false"] + names["miss"])
    miss = np.asarray(Image.open(tmp_path / "scan007-miss-01.png"))
    assert miss.shape == (SIZE_PX, SIZE_PX, 3)
    # The nodule (bright) sits in the middle of the crop, inside the yellow box.
    centre = miss[SIZE_PX // 2 - 4 : SIZE_PX // 2 + 4, SIZE_PX // 2 - 4 : SIZE_PX // 2 + 4].mean()
    assert centre > 150
    assert np.any(np.all(miss == (255, 200, 0), axis=2))
    fp = np.asarray(Image.open(tmp_path / "scan007-false-01.png"))
    assert np.any(np.all(fp == (255, 48, 48), axis=2))


# -- end to end: `dicom-node evaluate` on both formats ------------------------------------------


def test_evaluate_command_on_lidc_and_luna16(study: Study, tmp_path: Path) -> None:
    from dicom_node.cli import main

    out = tmp_path / "report"
    args = ["evaluate", str(study.lidc.parent), str(study.luna), "--out", str(out), "--no-progress"]
    assert main([*args, "--bootstrap", "100"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scans"] == 2 and report["skipped"] == []
    by_kind = {s["kind"]: s for s in report["per_study"]}
    lidc, luna = by_kind["lidc"], by_kind["luna16"]
    for s in (lidc, luna):
        assert "refused_by_model" not in s, s.get("refused_by_model")
    assert (lidc["name"], luna["name"]) == (study.series_uid, study.luna_uid)
    assert (lidc["nodules"], lidc["ignore_regions"]) == (3, 3)
    assert (luna["nodules"], luna["ignore_regions"]) == (3, 2)
    assert report["froc"]["all"]["nodules"] == 6
    assert set(report["froc"]["all"]["interval_95"]) == {"rounds", "seed", "sensitivity_at", "cpm"}
    # Same pixels and geometry: the same findings, at the same LPS positions, in both formats,
    # and the same verdicts (B is a 2-reader nodule in one, an excluded mark in the other).
    for key in ("findings", "false_findings", "true_positives", "ignored_findings"):
        assert lidc[key] == luna[key], key
    a, b, c = study.nodules
    for s in (lidc, luna):
        assert s["true_positives"] + s["false_positives"] + s["ignored_findings"] <= s["findings"]
        assert s["true_positives"] + len(s["misses"]) == 3
        assert any(
            np.linalg.norm(np.subtract(m["center_mm"], EMPTY["center_mm"])) < 1.5
            for m in s["misses"]
        )
        for f in s["false_findings"]:
            # Not on a positive (A, C) nor on the 2-reader / excluded nodule B.
            for n in (a, b, c):
                assert (
                    np.linalg.norm(np.subtract(f["center_mm"], n["center_mm"]))
                    > n["diameter_mm"] / 2
                )
        pictures = [f["picture"] for f in s["false_findings"]] + [m["picture"] for m in s["misses"]]
        assert all((out / "pictures" / p).is_file() for p in pictures)
    written = sorted(p.name for p in (out / "pictures").iterdir())
    assert len(written) == sum(len(s["false_findings"]) + len(s["misses"]) for s in (lidc, luna))
    # Patient-free: no patient name or ID of the phantom in the report.
    text = (out / "report.json").read_text()
    assert SPEC.patient_name not in text and "SYNTH-5" not in text


# -- the real chest CT collection ---------------------------------------------------------------


def test_real_lidc_reading_as_the_readme_says(real_chest_ct: Path) -> None:
    """lidc-idri-0002: no positive; the ~23 mm nodule of 2 of 4 readers and 51 single-reader
    marks (< 3 mm nodules, non-nodules) are ignored, where truth.json puts them."""
    folder = real_chest_ct / "lidc-idri-0002"
    (ref,) = read_lidc(folder)
    truth = json.loads((folder / "truth.json").read_text())
    assert ref.name == truth["series_instance_uid"]
    assert ref.positives == []
    two = [r for r in ref.ignore if r.get("readers") == 2]
    assert len(two) == 1 and 20.0 < 2 * two[0]["radius_mm"] < 27.0
    assert np.linalg.norm(np.subtract(two[0]["center_mm"], truth["ignore"][0]["center_mm"])) < 1.0
    single = [r for r in ref.ignore if "one reader" in r["why"]]
    assert len(single) == 51 and len(ref.ignore) == 52
    mine = np.array([r["center_mm"] for r in ref.ignore])
    theirs = np.array([m["center_mm"] for m in truth["ignore"]])
    nearest = np.linalg.norm(mine[:, None] - theirs[None], axis=2).min(axis=1)
    assert nearest.max() < 0.5


def test_real_chest_ct_truth_files(real_chest_ct: Path) -> None:
    refs = {r.name: r for r in find_references([real_chest_ct])}
    assert {r.kind for r in refs.values()} == {"real-chest-ct"} and len(refs) == 5
    for folder in sorted(real_chest_ct.iterdir()):
        if not (folder / "truth.json").is_file():
            continue
        truth = json.loads((folder / "truth.json").read_text())
        ref = refs[truth["series_instance_uid"]]
        if folder.name.startswith("lidc"):
            assert ref.positives == [] and len(ref.ignore) == 52
            continue
        (tumour,) = ref.positives
        assert len(tumour["boxes_mm"]) == len(truth["tumour_boxes"])
        # A finding at a boxed slice's box centre hits the tumour; one 30 mm outside does not.
        box = np.array(truth["tumour_boxes"][len(truth["tumour_boxes"]) // 2]["box_mm_lps"])
        inside, outside = box.mean(axis=0), box.max(axis=0) + np.array([30.0, 0.0, 0.0])
        scan = ScanResult(
            "t", ref.positives, [Candidate(tuple(inside), 0.9), Candidate(tuple(outside), 0.8)], []
        )
        assert match(scan).tolist() == [0, FALSE]
