"""Series selection: which series of a study a model runs on, and why the others were not chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicomgen import ct_series
from workers.models.base import InputRequirements
from workers.selection import select_series
from workers.volume import group_series, read_header

REQ = InputRequirements(
    min_slices=8, max_slice_thickness_mm=3.0, preferred_kernels=(r"lung", r"^b6")
)


def headers(paths: list[Path]) -> list[pydicom.Dataset]:
    return [read_header(p) for p in paths]


def series(
    tmp: Path,
    name: str,
    *,
    slices: int = 10,
    thickness: float = 1.0,
    kernel: str | None = None,
    **kw: object,
) -> list[pydicom.Dataset]:
    paths = ct_series(tmp / name, slices=slices, size=16, slice_thickness=thickness, **kw)  # type: ignore[arg-type]
    out = headers(paths)
    if kernel is not None:
        for ds in out:
            ds.ConvolutionKernel = kernel
    return out


def by_uid(*groups: list[pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for g in groups:
        out.update(group_series(g))
    return out


def uid(group: list[pydicom.Dataset]) -> str:
    return str(group[0].SeriesInstanceUID)


def test_thinnest_qualifying_series_wins_and_the_others_get_reasons(tmp_path: Path) -> None:
    thin = series(tmp_path, "thin", thickness=1.0)
    thick = series(tmp_path, "thick", thickness=2.5)
    too_thick = series(tmp_path, "5mm", thickness=5.0)
    result = select_series(by_uid(thick, thin, too_thick), REQ)
    assert result.series_instance_uid == uid(thin)
    assert result.reasons[uid(too_thick)] == "slices 5 mm thick, at most 3 mm accepted"
    assert "ranked lower" in result.reasons[uid(thick)]
    assert result.reason() == ""


def test_preferred_kernel_beats_thinner_slices(tmp_path: Path) -> None:
    soft = series(tmp_path, "soft", thickness=1.0, kernel="B30f")
    lung = series(tmp_path, "lung", thickness=2.0, kernel="LUNG")
    assert select_series(by_uid(soft, lung), REQ).series_instance_uid == uid(lung)


def test_reasons_when_nothing_qualifies(tmp_path: Path) -> None:
    few = series(tmp_path, "few", slices=4)
    mr = series(tmp_path, "mr", modality="MR")
    sagittal = series(tmp_path, "sag")
    for ds in sagittal:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [float(ds.InstanceNumber), 0.0, 0.0]
    scouts = series(tmp_path, "scout")
    for ds in scouts:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    result = select_series(by_uid(few, mr, sagittal, scouts), REQ)
    assert result.series_instance_uid is None
    assert result.reasons[uid(few)] == "only 4 slice(s), at least 8 needed"
    assert result.reasons[uid(mr)] == "modality MR is not CT"
    assert result.reasons[uid(sagittal)].startswith("not axial (sagittal")
    assert result.reasons[uid(scouts)] == "only localizer/scout images"
    line = result.reason()
    assert (
        line.startswith("no series qualifies:")
        and "only 4 slice(s)" in line
        and "modality MR" in line
    )
    assert result.reasons_by_series() == result.reasons


def test_reasons_carry_no_patient_data(tmp_path: Path) -> None:
    few = series(tmp_path, "few", slices=2)
    result = select_series(by_uid(few), REQ)
    text = result.reason() + " ".join(result.reasons.values())
    assert "PHICANARY" not in text and "ACC0001" not in text


def test_localizers_inside_a_series_do_not_count(tmp_path: Path) -> None:
    axial = series(tmp_path, "ax", slices=9)
    for ds in axial[:2]:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    result = select_series(by_uid(axial), REQ)
    assert result.series_instance_uid is None
    assert result.reasons[uid(axial)] == "only 7 slice(s), at least 8 needed"


def test_objects_that_are_not_images_are_not_a_series_to_run_on(tmp_path: Path) -> None:
    sr = pydicom.Dataset()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    result = select_series({sr.SeriesInstanceUID: [sr]}, REQ)
    assert result.series_instance_uid is None
    assert result.reasons[sr.SeriesInstanceUID].startswith("modality SR is not CT")


def test_several_images_per_position_are_refused(tmp_path: Path) -> None:
    phases = series(tmp_path, "phases", slices=10)
    extra = series(tmp_path, "phase2", slices=10, series_uid=uid(phases))
    result = select_series(group_series(phases + extra), REQ)
    assert result.series_instance_uid is None
    assert "more than one image" in result.reasons[uid(phases)]


def test_multiframe_frames_count_as_slices(tmp_path: Path) -> None:
    import highdicom as hd

    paths = ct_series(tmp_path / "mf", slices=10, size=16, slice_thickness=1.0)
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths],
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    result = select_series({mf.SeriesInstanceUID: [mf]}, REQ)
    assert result.series_instance_uid == mf.SeriesInstanceUID
    assert result.summaries[0].images == 10


def test_too_many_voxels_is_refused(tmp_path: Path) -> None:
    big = series(tmp_path, "big", slices=10)
    req = InputRequirements(min_slices=8, max_voxels=10 * 16 * 16 - 1)
    assert select_series(by_uid(big), req).reasons[uid(big)].startswith("too large")


def test_gantry_tilt_is_still_axial(real_ct: Path) -> None:
    folder = real_ct / "ge-head-tilt"
    if not folder.is_dir():
        pytest.skip("ge-head-tilt not found")
    hs = headers(sorted(folder.glob("*.dcm")))
    req = InputRequirements(min_slices=16, max_slice_thickness_mm=8.0)
    result = select_series(group_series(hs), req)
    assert result.series_instance_uid == str(hs[0].SeriesInstanceUID)
    # 18.5 degrees of tilt, and the normal is not the z axis.
    normal = np.cross(
        [float(v) for v in hs[0].ImageOrientationPatient[:3]],
        [float(v) for v in hs[0].ImageOrientationPatient[3:]],
    )
    assert abs(normal[2]) < 0.96


def test_a_localizer_of_another_matrix_size_does_not_refuse_the_series(tmp_path: Path) -> None:
    """Selection counts what the loader loads: a 32x32 scout in a 16x16 series is left out, not
    'two matrix sizes'."""
    axial = series(tmp_path, "ax", slices=9)
    scout = ct_series(tmp_path / "scout", slices=1, size=32, series_uid=uid(axial))
    scout_header = read_header(scout[0])
    scout_header.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    result = select_series(group_series([*axial, scout_header]), REQ)
    assert result.series_instance_uid == uid(axial)
    assert result.summaries[0].images == 9
