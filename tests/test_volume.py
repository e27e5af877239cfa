"""Volume loading: geometry of a real tilted, unevenly spaced series; multi-frame and compressed
inputs equal to their single-frame uncompressed equivalents; localizers, duplicates, rescale,
resampling and the pixel-bomb check."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from tests.dicomgen import ct_series
from workers.grid import uniform_grid
from workers.volume import VolumeError, load_series

GE = "ge-head-tilt"


@pytest.fixture
def ge_paths(real_ct: Path) -> list[Path]:
    folder = real_ct / GE
    if not folder.is_dir():
        pytest.skip(f"{GE} not found under {real_ct}")
    paths = sorted(folder.glob("*.dcm"))
    random.Random(3).shuffle(paths)  # input order must not matter
    return paths


@pytest.fixture
def phantom_paths(tmp_path: Path) -> list[Path]:
    """A small synthetic chest series with lungs, vessels and nodules (real structure to compare)."""
    from dicom_node.cli import main

    out = tmp_path / "phantom"
    assert main(["synth", str(out), "--seed", "2", "--slices", "24", "--matrix", "128", "--pixel-size", "1.4",
                 "--thickness", "2", "--nodules", "2", "--no-progress"]) == 0  # fmt: skip
    return sorted(out.glob("slice_*.dcm"))


# -- the real tilted, unevenly spaced GE series --------------------------------------------------


def test_real_tilted_series_voxel_centres_match_every_slice_position(ge_paths: list[Path]) -> None:
    vol = load_series(ge_paths)
    assert vol.shape == (28, 512, 512)
    assert not vol.uniform
    assert vol.tilt_degrees == pytest.approx(18.5, abs=0.1)
    assert any("tilted" in n for n in vol.notes) and any("spacing varies" in n for n in vol.notes)
    rows, cols = vol.shape[1:]
    for k, source in enumerate(vol.slices):
        ds = pydicom.dcmread(source.path, stop_before_pixels=True)
        assert source.sop_instance_uid == ds.SOPInstanceUID
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        # The first voxel centre is IPP; any other is IPP + i * dc * row + j * dr * col (PS3.3 C.7.6.2.1.1).
        assert np.allclose(vol.index_to_patient(k, 0, 0), ipp, atol=1e-4)
        for j, i in ((0, cols - 1), (rows - 1, 0), (137, 402)):
            assert np.allclose(
                vol.index_to_patient(k, j, i), ipp + i * dc * row_dir + j * dr * col_dir, atol=1e-4
            )
        centres = vol.voxel_centres(k)
        assert np.allclose(centres[0, 0], ipp, atol=1e-4)
        assert np.allclose(
            centres[rows - 1, cols - 1],
            ipp + (cols - 1) * dc * row_dir + (rows - 1) * dr * col_dir,
            atol=1e-4,
        )
        # The array holds this file's pixels, rescaled.
        pixels = pydicom.dcmread(source.path).pixel_array.astype(np.float32)
        expected = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        assert np.array_equal(vol.array[k], expected)
    # Sorted along the slice normal, never by file order or InstanceNumber.
    assert np.all(np.diff(vol.slice_offsets) > 0)
    gaps = np.diff(vol.slice_offsets)
    assert gaps.min() == pytest.approx(1.08, abs=0.01) and gaps.max() == pytest.approx(
        7.0, abs=0.01
    )
    # patient_to_index inverts index_to_patient even across the uneven gap.
    for k in (0.0, 13.5, 14.25, 27.0):
        assert np.allclose(
            vol.patient_to_index(*vol.index_to_patient(k, 100.0, 300.0)),
            (k, 100.0, 300.0),
            atol=1e-6,
        )


def test_mask_on_real_tilted_series_encodes_to_a_valid_seg_on_the_right_slices(
    ge_paths: list[Path],
) -> None:
    """A detector mask on slices 12-16 (across the 1.08 mm gap) becomes a SEG that dciodvfy
    accepts, whose frames reference exactly those source images at their positions."""
    pytest.importorskip("highdicom")
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    from tests.resultdata import detection, job_for, read
    from workers.models.measure import finding_from_mask
    from workers.results import EncodeOptions, encode_results, run_dciodvfy

    vol = load_series(ge_paths)
    mask = np.zeros((5, 40, 30), dtype=bool)
    mask[:, 5:35, 4:26] = True
    finding = finding_from_mask(vol, mask, 0.8, offset=(12, 240, 250))
    assert finding is not None
    assert finding.key_slice in range(12, 17)
    assert finding.mask is not None and finding.mask.shape == vol.shape
    result = detection(vol, [finding])
    objects = encode_results(vol, result, job_for(vol), EncodeOptions(dciodvfy=False))
    seg_obj = next(o for o in objects if o.kind == "seg")
    report = run_dciodvfy(seg_obj.data)
    assert report.errors == [], report.output
    seg = read(seg_obj.data)
    referenced = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = next(n for n, s in enumerate(vol.slices) if s.sop_instance_uid == src)
        referenced.append(k)
        ipp = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, vol.positions[k], atol=1e-3)
    assert sorted(referenced) == [12, 13, 14, 15, 16]


# -- multi-frame and compressed equivalents ------------------------------------------------------


def _same_volume(a, b) -> None:  # type: ignore[no-untyped-def]
    assert a.shape == b.shape
    assert np.array_equal(a.array, b.array)
    assert np.allclose(a.positions, b.positions, atol=1e-4)
    assert np.allclose(a.orientation, b.orientation, atol=1e-6)
    assert a.pixel_spacing == pytest.approx(b.pixel_spacing)
    assert a.slice_spacing == pytest.approx(b.slice_spacing, abs=1e-4)
    assert np.allclose(a.affine, b.affine, atol=1e-4)


def _legacy_multiframe(paths: list[Path], out: Path, transfer_syntax: str | None = None) -> Path:
    import highdicom as hd

    datasets = [pydicom.dcmread(p) for p in paths]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets,
        series_instance_uid=datasets[0].SeriesInstanceUID,
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        **({"transfer_syntax_uid": transfer_syntax} if transfer_syntax else {}),
    )
    mf.save_as(out)
    return out


@pytest.mark.parametrize("transfer_syntax", [None, RLELossless])
def test_multiframe_equals_single_frame(
    phantom_paths: list[Path], tmp_path: Path, transfer_syntax: str | None
) -> None:
    single = load_series(phantom_paths)
    path = _legacy_multiframe(phantom_paths, tmp_path / "mf.dcm", transfer_syntax)
    multi = load_series([path])
    _same_volume(multi, single)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    assert {s.sop_instance_uid for s in multi.slices} == {header.SOPInstanceUID}
    assert sorted(s.frame_number for s in multi.slices) == list(range(1, len(phantom_paths) + 1))
    for k, s in enumerate(multi.slices):
        # array[k] is frame s.frame_number: its own plane position says so.
        item = header.PerFrameFunctionalGroupsSequence[s.frame_number - 1]
        ipp = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(ipp, multi.positions[k], atol=1e-4)


def _dcmcjpeg(paths: list[Path], out: Path, flag: str) -> list[Path]:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) is not installed")
    out.mkdir()
    outs = []
    for p in paths:
        q = out / p.name
        subprocess.run(
            ["dcmcjpeg", flag, str(p), str(q)], check=True, capture_output=True, timeout=60
        )
        outs.append(q)
    return outs


@pytest.mark.parametrize(
    ("flag", "uid"),
    [("+e1", JPEGLosslessSV1), ("+el", "1.2.840.10008.1.2.4.57")],
    ids=["jpeg-lossless-sv1", "jpeg-lossless-process14"],
)
def test_jpeg_lossless_process14_equals_uncompressed(
    phantom_paths: list[Path], tmp_path: Path, flag: str, uid: str
) -> None:
    compressed = _dcmcjpeg(phantom_paths, tmp_path / "jpeg", flag)
    assert (
        pydicom.dcmread(compressed[0], stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    )
    _same_volume(load_series(compressed), load_series(phantom_paths))


def test_jpeg_lossless_real_tilted_series_equals_uncompressed(
    ge_paths: list[Path], tmp_path: Path
) -> None:
    compressed = _dcmcjpeg(ge_paths, tmp_path / "jpeg", "+e1")
    _same_volume(load_series(compressed), load_series(ge_paths))


@pytest.mark.parametrize(
    "uid", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=["jpeg-ls", "jpeg2000", "rle"]
)
def test_other_lossless_syntaxes_equal_uncompressed(
    phantom_paths: list[Path], tmp_path: Path, uid: str
) -> None:
    out = tmp_path / "c"
    out.mkdir()
    compressed = []
    for p in phantom_paths:
        ds = pydicom.dcmread(p)
        ds.compress(uid)
        q = out / p.name
        ds.save_as(q)
        compressed.append(q)
    _same_volume(load_series(compressed), load_series(phantom_paths))


def test_datasets_in_memory_load_like_files(phantom_paths: list[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in reversed(phantom_paths)]
    _same_volume(load_series(datasets), load_series(phantom_paths))


# -- what the loader leaves out or refuses -------------------------------------------------------


def test_sorted_by_position_not_instance_number(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=6, size=32)
    for n, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ds.InstanceNumber = [4, 1, 6, 2, 5, 3][n]  # scrambled
        ds.save_as(p)
    vol = load_series(paths)
    z = [float(pydicom.dcmread(s.path).ImagePositionPatient[2]) for s in vol.slices]
    assert z == sorted(z)


def test_localizer_in_the_series_is_left_out(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=6, size=32)
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(tmp_path / "s" / "scout.dcm")
    vol = load_series([*paths, tmp_path / "s" / "scout.dcm"])
    assert vol.shape[0] == 6
    assert any("localizer" in n for n in vol.notes)


def test_rescale_is_applied_per_image(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=4, size=32)
    ds = pydicom.dcmread(paths[2])
    stored = ds.pixel_array.astype(np.float32)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -2048
    ds.save_as(paths[2])
    vol = load_series(paths)
    k = next(n for n, s in enumerate(vol.slices) if s.path == str(paths[2]))
    assert np.array_equal(vol.array[k], stored * 2 - 2048)


def test_duplicate_file_is_dropped_but_two_images_at_one_position_are_refused(
    tmp_path: Path,
) -> None:
    paths = ct_series(tmp_path / "s", slices=5, size=32)
    vol = load_series([*paths, paths[1]])
    assert vol.shape[0] == 5 and any("duplicate" in n for n in vol.notes)
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "s" / "phase2.dcm")
    with pytest.raises(VolumeError, match="share a slice position"):
        load_series([*paths, tmp_path / "s" / "phase2.dcm"])


def test_several_series_need_a_choice(tmp_path: Path) -> None:
    a = ct_series(tmp_path / "a", slices=3, size=32)
    b = ct_series(tmp_path / "b", slices=4, size=32)
    with pytest.raises(VolumeError, match="2 series"):
        load_series(a + b)
    uid = pydicom.dcmread(b[0]).SeriesInstanceUID
    assert load_series(a + b, series_instance_uid=uid).shape[0] == 4


def test_pixel_bomb_is_refused_from_the_headers(tmp_path: Path) -> None:
    """Headers claiming 300 x 8192² voxels are refused before any pixel data is decoded (the
    files hold only a few bytes of pixel data, so decoding would fail with another error)."""
    paths = ct_series(tmp_path / "s", slices=300, size=16)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.Rows = ds.Columns = 8192
        ds.save_as(p)
    with pytest.raises(VolumeError, match="too large"):
        load_series(paths)
    small = ct_series(tmp_path / "t", slices=4, size=32)
    with pytest.raises(VolumeError, match="too large"):
        load_series(small, max_voxels=4 * 32 * 32 - 1)


def test_undecodable_pixel_data_is_a_clear_error(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=3, size=32)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[1])
    with pytest.raises(VolumeError, match="cannot decode pixel data"):
        load_series(paths)


def test_uniform_grid_resamples_and_maps_back_to_source_slices(tmp_path: Path) -> None:
    """A missing slice leaves a 4 mm gap in a 2 mm series: the detector grid is even again, and
    grid results map back to the source slice they came from."""
    paths = ct_series(tmp_path / "s", slices=8, size=32, slice_thickness=2.0)
    del paths[3]
    vol = load_series(paths)
    assert not vol.uniform
    grid = uniform_grid(vol)
    assert not grid.identity
    assert len(grid.offsets) == 8 and np.allclose(np.diff(grid.offsets), 2.0)
    # Grid planes that coincide with a source slice carry its pixels exactly.
    for m, off in enumerate(grid.offsets):
        k = np.flatnonzero(np.isclose(vol.slice_offsets, off))
        if k.size:
            assert np.array_equal(grid.array[m], vol.array[k[0]])
            assert grid.to_source_index(float(m)) == pytest.approx(float(k[0]))
    mask = np.zeros(grid.array.shape, dtype=bool)
    mask[5] = True
    src = grid.mask_to_source(mask)
    assert src.shape == vol.shape
    hit = np.flatnonzero(src.any(axis=(1, 2)))
    assert len(hit) == 1 and vol.slice_offsets[hit[0]] == pytest.approx(grid.offsets[5])
    with pytest.raises(VolumeError, match="gap"):
        uniform_grid(vol, max_gap_mm=3.0)


def test_malformed_rescale_is_a_clear_error(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=3, size=32)
    ds = pydicom.dcmread(paths[1])
    ds["RescaleSlope"] = pydicom.DataElement("RescaleSlope", "LO", "x")
    ds.save_as(paths[1])
    with pytest.raises(VolumeError, match="RescaleSlope is malformed"):
        load_series(paths)
