"""Series geometry from headers (dicom_node.geometry): which images are slices, their order along
the normal, spacing and tilt, enhanced multi-frame planes, malformed values; and the promise the
job preview makes: its slice k is the volume loader's slice k, so boxes land on the image the
model saw."""

from __future__ import annotations

import copy
import math
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from dicom_node.geometry import (
    DUPLICATE,
    LOCALIZER,
    NO_GEOMETRY,
    NON_IMAGE,
    OTHER_ORIENTATION,
    GeometryError,
    SliceOrder,
    evenly_spaced,
    functional_group_value,
    order_slices,
    pixel_rescale,
    slice_geometry,
    stack_spacing,
)
from dicom_node.preview import order_frames
from tests.dicomgen import ct_series
from workers.volume import VolumeError, load_series


def headers(tmp: Path, slices: int = 6, **kw: object) -> list[Dataset]:
    paths = ct_series(tmp, slices=slices, size=16, **kw)  # type: ignore[arg-type]
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def z_of(order: SliceOrder) -> list[float]:
    return [s.position[2] for s in order.slices]


def reasons(order: SliceOrder) -> list[tuple[int, str]]:
    return sorted((x.source, x.reason) for x in order.left_out)


# -- which images are slices ---------------------------------------------------------------------


def test_localizers_are_left_out_by_image_type_of_any_form(tmp_path: Path) -> None:
    hs = headers(tmp_path / "s", slices=6)
    hs[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    hs[1].ImageType = "SCOUT"  # VM 1: pydicom gives a str, not a list
    hs[2].ImageType = ["DERIVED", "SECONDARY", "TOPOGRAM"]
    order = order_slices(hs)
    assert len(order.slices) == 3
    assert reasons(order) == [(0, LOCALIZER), (1, LOCALIZER), (2, LOCALIZER)]
    assert order.notes() == ["3 localizer/scout image(s) left out"]


def test_a_scout_without_image_type_is_left_out_by_its_orientation(tmp_path: Path) -> None:
    hs = headers(tmp_path / "s", slices=6)
    hs[3].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal, not marked as a localizer
    order = order_slices(hs)
    assert len(order.slices) == 5 and reasons(order) == [(3, OTHER_ORIENTATION)]
    assert np.allclose(order.normal, [0, 0, 1])


def test_objects_that_are_not_images_are_left_out(tmp_path: Path) -> None:
    hs = headers(tmp_path / "s", slices=4)
    sr = Dataset()
    sr.Modality = "SR"
    seg_as_ct = Dataset()  # a SEG whose Modality was rewritten still is no image
    seg_as_ct.Modality = "CT"
    seg_as_ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg_as_ct.Rows = seg_as_ct.Columns = 16
    no_rows = Dataset()
    no_rows.Modality = "CT"
    order = order_slices([sr, *hs, seg_as_ct, no_rows])
    assert len(order.slices) == 4
    assert reasons(order) == [(0, NON_IMAGE), (5, NON_IMAGE), (6, NON_IMAGE)]


# -- order, spacing, tilt ------------------------------------------------------------------------


def test_order_follows_the_normal_not_instance_number_or_input_order(tmp_path: Path) -> None:
    hs = headers(tmp_path / "s", slices=7)
    for ds in hs:
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
    shuffled = list(hs)
    random.Random(5).shuffle(shuffled)
    order = order_slices(shuffled)
    # Normal (0, 0, 1): ascending z; dicomgen writes z = -2i, so the last file comes first.
    assert z_of(order) == sorted(z_of(order)) == [-12.0, -10.0, -8.0, -6.0, -4.0, -2.0, 0.0]
    assert list(order.offsets) == z_of(order)
    assert [shuffled[s.source] for s in order.slices] == list(reversed(hs))


def test_a_flipped_orientation_reverses_the_order(tmp_path: Path) -> None:
    """With the row direction reversed the normal points to the feet: slices run head first."""
    hs = headers(tmp_path / "s", slices=5)
    for ds in hs:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    order = order_slices(hs)
    assert np.allclose(order.normal, [0, 0, -1])
    assert z_of(order) == [0.0, -2.0, -4.0, -6.0, -8.0]
    assert np.all(np.diff(order.offsets) > 0)


def test_gantry_tilt_is_kept_and_measured(tmp_path: Path) -> None:
    tilt = 15.0
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    hs = headers(tmp_path / "s", slices=6)
    for ds in hs:
        ds.ImageOrientationPatient = [1, 0, 0, 0, c, -s]  # the gantry tilts the column direction
    order = order_slices(hs)
    assert len(order.slices) == 6 and not order.left_out
    assert np.allclose(order.normal, [0, s, c])
    positions = np.array([p.position for p in order.slices])
    spacing = stack_spacing(positions, order.normal)
    assert spacing.tilted and spacing.tilt_degrees == pytest.approx(tilt, abs=1e-6)
    assert spacing.even and spacing.spacing == pytest.approx(2.0 * c)
    straight = order_slices(headers(tmp_path / "t"))
    untilted = stack_spacing(np.array([p.position for p in straight.slices]), straight.normal)
    assert not untilted.tilted and untilted.tilt_degrees == pytest.approx(0.0)


def test_uneven_spacing_is_measured(tmp_path: Path) -> None:
    hs = headers(tmp_path / "s", slices=6)
    del hs[2]  # a missing slice: one 4 mm gap in a 2 mm series
    order = order_slices(hs)
    spacing = stack_spacing(np.array([p.position for p in order.slices]), order.normal)
    assert not spacing.even and spacing.spacing == pytest.approx(2.0)
    assert sorted(spacing.gaps.tolist()) == pytest.approx([2.0, 2.0, 2.0, 4.0])
    assert evenly_spaced(np.array([2.0, 2.01, 1.99]), 2.0)
    assert not evenly_spaced(np.array([2.0, 2.1]), 2.0)
    one = stack_spacing(np.zeros((1, 3)), np.array([0.0, 0, 1]), thickness=5.0)
    assert one.spacing == 5.0 and one.even and not one.tilted


def test_duplicates_and_shared_positions(tmp_path: Path) -> None:
    hs = headers(tmp_path / "s", slices=5)
    order = order_slices([*hs, hs[1]])  # the same image sent twice
    assert len(order.slices) == 5 and order.shared_positions == 0
    assert reasons(order) == [(5, DUPLICATE)] and order.notes() == ["1 duplicate image(s) left out"]
    phase2 = copy.deepcopy(hs[1])
    phase2.SOPInstanceUID = generate_uid()  # another image at the same place (another phase)
    order = order_slices([*hs, phase2, hs[1]])  # A, B, A at one position
    assert order.shared_positions == 1 and len(order.slices) == 6
    assert reasons(order) == [(6, DUPLICATE)]


# -- malformed planes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value", "detail"),
    [
        ("ImagePositionPatient", ["1.0", "2.0"], "ImagePositionPatient must have 3 finite values"),
        ("ImagePositionPatient", ["1", "x", "3"], "ImagePositionPatient is malformed"),
        ("ImagePositionPatient", ["1", "nan", "3"], "ImagePositionPatient must have 3 finite"),
        (
            "ImageOrientationPatient",
            ["1", "0", "0", "1", "0", "0"],
            "not two orthogonal unit vectors",
        ),
        (
            "ImageOrientationPatient",
            ["2", "0", "0", "0", "1", "0"],
            "not two orthogonal unit vectors",
        ),
        ("ImageOrientationPatient", None, "image without ImageOrientationPatient"),
        ("ImagePositionPatient", None, "image without ImagePositionPatient"),
        ("PixelSpacing", None, "image without PixelSpacing"),
        ("PixelSpacing", ["0", "0.8"], "PixelSpacing must be positive"),
    ],
)
def test_malformed_planes_are_left_out_with_a_reason(
    tmp_path: Path, keyword: str, value: object, detail: str
) -> None:
    hs = headers(tmp_path / "s", slices=5)
    bad = hs[2]
    if value is None:
        delattr(bad, keyword)
    else:
        # Raw strings as a damaged archive holds them (pydicom's DS would refuse to set some).
        bad[keyword] = pydicom.DataElement(keyword, "LO", value)
    with pytest.raises(GeometryError) as err:
        slice_geometry(bad)
    assert detail in str(err.value)
    order = order_slices(hs)
    assert len(order.slices) == 4
    assert [(x.source, x.reason) for x in order.left_out] == [(2, NO_GEOMETRY)]
    assert detail in order.left_out[0].detail
    assert order.notes() == ["1 instance(s) without usable image geometry left out"]


def test_an_element_pydicom_cannot_decode_leaves_the_image_out(tmp_path: Path) -> None:
    """A header the suite's fuzzing found: ImageOrientationPatient with a damaged VR, which
    pydicom only fails on when the value is first read."""
    found = Path(__file__).parent / "fuzz_corpus" / "part10" / "found-preview-geometry-2.dcm"
    with warnings.catch_warnings():  # pydicom may warn about the damaged VR while reading
        warnings.simplefilter("ignore")
        damaged = pydicom.dcmread(found, stop_before_pixels=True)
    hs = headers(tmp_path / "s", slices=3)
    order = order_slices([*hs, damaged])
    assert len(order.slices) == 3
    assert [(x.source, x.reason, x.detail) for x in order.left_out] == [
        (3, NO_GEOMETRY, "ImageOrientationPatient cannot be decoded")
    ]


# -- enhanced (multi-frame) planes ---------------------------------------------------------------


def _enhanced(zs: list[float], *, shared_position: bool = False) -> Dataset:
    """An Enhanced CT header: orientation and pixel measures shared, one plane position per
    frame (frames stored in the order of ``zs``)."""

    def item(**kw: object) -> Dataset:
        ds = Dataset()
        for k, v in kw.items():
            setattr(ds, k, v)
        return ds

    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 16
    ds.NumberOfFrames = len(zs)
    ds.SharedFunctionalGroupsSequence = [
        item(
            PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
            PixelMeasuresSequence=[item(PixelSpacing=[0.5, 0.5], SliceThickness=1.0)],
            PixelValueTransformationSequence=[item(RescaleSlope=1, RescaleIntercept=-1024)],
            **(
                {"PlanePositionSequence": [item(ImagePositionPatient=[0, 0, 0])]}
                if shared_position
                else {}
            ),
        )
    ]
    ds.PerFrameFunctionalGroupsSequence = [
        item(
            PlanePositionSequence=[item(ImagePositionPatient=[0, 0, z])],
            CTImageFrameTypeSequence=[item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL"])],
        )
        for z in zs
    ]
    return ds


def test_enhanced_frames_are_ordered_by_their_own_plane_position() -> None:
    mf = _enhanced([4.0, 0.0, 2.0, 6.0])
    order = order_slices([mf])
    assert [s.frame_number for s in order.slices] == [2, 3, 1, 4]
    assert list(order.offsets) == [0.0, 2.0, 4.0, 6.0]
    assert {s.pixel_spacing for s in order.slices} == {(0.5, 0.5)}
    assert {s.thickness for s in order.slices} == {1.0}
    assert pixel_rescale(mf, 2) == (1.0, -1024.0)
    # A per-frame value wins over the shared one.
    mf.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [Dataset()]
    mf.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence[0].RescaleSlope = 2
    assert pixel_rescale(mf, 2) == (2.0, -1024.0) and pixel_rescale(mf, 1) == (1.0, -1024.0)
    assert functional_group_value(mf, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    assert functional_group_value(mf, 0, "NoSuchSequence", "ImagePositionPatient") is None


def test_enhanced_localizer_frames_and_incomplete_instances() -> None:
    mf = _enhanced([0.0, 2.0, 4.0])
    mf.PerFrameFunctionalGroupsSequence[0].CTImageFrameTypeSequence[0].FrameType = [
        "ORIGINAL",
        "PRIMARY",
        "LOCALIZER",
    ]
    order = order_slices([mf])
    assert [s.frame_number for s in order.slices] == [2, 3]
    assert [(x.frame_number, x.reason) for x in order.left_out] == [(1, LOCALIZER)]

    short = _enhanced([0.0, 2.0, 4.0])
    short.NumberOfFrames = 4  # one per-frame item missing
    with pytest.raises(GeometryError, match="one per-frame functional group per frame"):
        slice_geometry(short)
    no_position = _enhanced([0.0, 2.0])
    del no_position.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    with pytest.raises(GeometryError, match="lacks plane position"):
        slice_geometry(no_position)
    # A shared plane position applies to every frame: all at one place, which the loader refuses.
    shared = _enhanced([0.0, 2.0], shared_position=True)
    for frame in shared.PerFrameFunctionalGroupsSequence:
        del frame.PlanePositionSequence
    assert order_slices([shared]).shared_positions == 1
    too_many = _enhanced([0.0])
    too_many.NumberOfFrames = 70_000
    with pytest.raises(GeometryError, match="NumberOfFrames"):
        slice_geometry(too_many)


# -- the preview's slice k is the loader's slice k -----------------------------------------------


def _same_order(paths: list[Path]) -> None:
    """order_frames (edge) and load_series (worker) number the same images the same way."""
    frames = order_frames(paths)
    volume = load_series(paths)
    assert len(frames) == volume.shape[0]
    for k, (frame, source) in enumerate(zip(frames, volume.slices, strict=True)):
        assert str(frame.path) == source.path, f"slice {k}"
        assert frame.geometry.sop_instance_uid == source.sop_instance_uid
        assert frame.geometry.frame_number == source.frame_number
        assert np.allclose(frame.geometry.position, volume.positions[k])
        assert frame.offset == pytest.approx(volume.slice_offsets[k])


def test_preview_and_loader_agree_on_a_series_with_everything_left_out(tmp_path: Path) -> None:
    """Localizer, stray orientation, duplicate, an image without position and one without
    pixel spacing: the old preview put the last two at offset 0 / kept them, shifting every
    key slice after them by one."""
    folder = tmp_path / "s"
    paths = ct_series(folder, slices=10, size=32)
    extras = []
    for name, change in (
        ("scout", lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"])),
        ("coronal", lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1])),
        ("no-position", lambda ds: delattr(ds, "ImagePositionPatient")),
        ("no-spacing", lambda ds: delattr(ds, "PixelSpacing")),
    ):
        ds = pydicom.dcmread(paths[4])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, -7.0]  # between slices 3 and 4
        change(ds)
        ds.save_as(folder / f"{name}.dcm")
        extras.append(folder / f"{name}.dcm")
    everything = [*paths, *extras, paths[6]]  # and one file twice
    random.Random(11).shuffle(everything)
    _same_order(everything)
    volume = load_series(everything)
    assert volume.shape[0] == 10
    assert volume.notes == [
        "1 localizer/scout image(s) left out",
        "2 instance(s) without usable image geometry left out",
        "1 image(s) with another orientation left out",
        "1 duplicate image(s) left out",
    ]


def test_preview_and_loader_agree_on_a_multiframe_instance(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom")
    paths = ct_series(tmp_path / "s", slices=6, size=32)
    datasets = [pydicom.dcmread(p) for p in reversed(paths)]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=datasets[0].SeriesInstanceUID,
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    mf.save_as(tmp_path / "mf.dcm")
    _same_order([tmp_path / "mf.dcm"])
    single = load_series(paths)
    assert np.allclose(load_series([tmp_path / "mf.dcm"]).positions, single.positions)


@pytest.mark.parametrize("folder", ["ge-head-tilt", "philips-phantom-head"])
def test_preview_and_loader_agree_on_real_ct(real_ct: Path, folder: str) -> None:
    paths = sorted((real_ct / folder).glob("*.dcm"))
    assert paths, f"{folder} not found under {real_ct}"
    random.Random(2).shuffle(paths)
    _same_order(paths)


def test_shared_positions_are_refused_by_the_loader_and_kept_by_the_preview(
    tmp_path: Path,
) -> None:
    paths = ct_series(tmp_path / "s", slices=4, size=32)
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "phase2.dcm")
    with pytest.raises(VolumeError, match="share a slice position"):
        load_series([*paths, tmp_path / "s" / "phase2.dcm"])
    # No job result can point into such a series; the preview still shows its images.
    assert len(order_frames([*paths, tmp_path / "s" / "phase2.dcm"])) == 5


def test_the_edge_imports_neither_workers_nor_torch() -> None:
    code = (
        "import sys, dicom_node.geometry, dicom_node.preview; "
        "bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'workers']; "
        "sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert run.returncode == 0, run.stderr
