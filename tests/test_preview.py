"""Job previews rendered on the edge (pydicom + numpy + Pillow): the right slice, the lung
window, the boxes where the findings are, compressed inputs, and clear placeholders."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, RLELossless
from sqlalchemy import select

from dicom_node.preview import (
    BOX_COLOUR,
    LUNG_WINDOW,
    OUTPUT_SIZE,
    PreviewUnavailable,
    job_preview,
    order_frames,
    render_preview,
)
from dicom_node.state import Job, Series, Study, utcnow
from tests.dicomgen import ct_series
from tests.peers import storescu

SIZE = 64
SCALE = OUTPUT_SIZE // SIZE


def level_of(k: int) -> int:
    """A distinct HU value for the body of the k-th slice along the normal (inside the window)."""
    return -1200 + 150 * k


def grey(hu: float) -> float:
    width, centre = LUNG_WINDOW
    return (hu - (centre - width / 2)) / width * 255


def labelled_series(tmp: Path, slices: int = 6) -> list[Path]:
    """A CT series whose k-th slice along the normal has body value level_of(k), with instance
    numbers running the other way and files named in random order."""
    paths = ct_series(tmp, slices=slices, size=SIZE)
    by_position = sorted(
        paths,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    for k, path in enumerate(by_position):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = slices - k  # the other way round: the order must come from positions
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        stored = np.where(hu > -500, level_of(k), -1000) - int(ds.RescaleIntercept)
        ds.PixelData = stored.astype(np.int16).tobytes()
        ds.save_as(path)
    shuffled = list(paths)
    random.Random(7).shuffle(shuffled)
    return shuffled


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def red(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] > 200) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)


def test_slices_are_ordered_along_the_normal_and_the_key_slice_is_shown(tmp_path: Path) -> None:
    paths = labelled_series(tmp_path / "ct")
    frames = order_frames(paths)
    assert [f.offset for f in frames] == sorted(f.offset for f in frames)
    for k in (0, 2, 5):
        finding = {
            "label": "Nodule",
            "confidence": 0.8,
            "key_slice": k,
            "bbox_2d": [20, 24, 29, 33],
        }
        preview = render_preview(paths, [finding])
        rgb = png(preview.png)
        assert rgb.shape == (OUTPUT_SIZE, OUTPUT_SIZE, 3)
        centre = rgb[OUTPUT_SIZE // 2 + 40, OUTPUT_SIZE // 2 + 40]
        assert abs(float(centre[0]) - grey(level_of(k))) <= 2, f"slice {k} not the one shown"
        assert preview.slice_index == k and preview.boxes == 1

    # The middle slice when there is no finding.
    rgb = png(render_preview(paths, []).png)
    assert abs(float(rgb[OUTPUT_SIZE // 2, OUTPUT_SIZE // 2, 0]) - grey(level_of(3))) <= 2
    assert not red(rgb).any()


def test_the_box_outlines_the_finding(tmp_path: Path) -> None:
    paths = labelled_series(tmp_path / "ct")
    c0, r0, c1, r1 = 20, 24, 29, 33
    rgb = png(
        render_preview(
            paths,
            [{"label": "Nodule", "confidence": 0.8, "key_slice": 2, "bbox_2d": [c0, r0, c1, r1]}],
        ).png
    )
    mask = red(rgb)
    assert tuple(rgb[r0 * SCALE + 1, (c0 + c1) // 2 * SCALE]) == BOX_COLOUR  # top edge
    assert tuple(rgb[(r1 + 1) * SCALE - 2, (c0 + c1) // 2 * SCALE]) == BOX_COLOUR  # bottom edge
    assert tuple(rgb[(r0 + r1) // 2 * SCALE, c0 * SCALE + 1]) == BOX_COLOUR  # left edge
    assert tuple(rgb[(r0 + r1) // 2 * SCALE, (c1 + 1) * SCALE - 2]) == BOX_COLOUR  # right edge
    ys, xs = np.nonzero(mask)
    assert ys.min() >= r0 * SCALE - 1 and ys.max() <= (r1 + 1) * SCALE
    assert xs.min() >= c0 * SCALE - 1 and xs.max() <= (c1 + 1) * SCALE
    assert not mask[(r0 + 2) * SCALE : (r1 - 1) * SCALE, (c0 + 2) * SCALE : (c1 - 1) * SCALE].any()
    # A finding on another slice is not drawn on this one.
    other = render_preview(
        paths,
        [
            {"key_slice": 2, "bbox_2d": [c0, r0, c1, r1]},
            {"key_slice": 4, "bbox_2d": [40, 40, 50, 50]},
        ],
    )
    assert (
        other.boxes == 1
        and not red(png(other.png))[40 * SCALE : 51 * SCALE, 40 * SCALE + 4 : 51 * SCALE - 4].any()
    )


def test_localizer_and_compressed_instances(tmp_path: Path) -> None:
    paths = labelled_series(tmp_path / "ct")
    plain = render_preview(paths, [{"key_slice": 1, "bbox_2d": [10, 10, 20, 20]}]).png
    for path in paths:  # RLE Lossless: decoded by pydicom itself, no plug-in needed
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    scout = pydicom.dcmread(paths[0])
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.save_as(tmp_path / "ct" / "scout.dcm")
    with_scout = [*paths, tmp_path / "ct" / "scout.dcm"]
    assert len(order_frames(with_scout)) == len(paths)
    assert np.array_equal(
        png(render_preview(with_scout, [{"key_slice": 1, "bbox_2d": [10, 10, 20, 20]}]).png),
        png(plain),
    )


def test_undecodable_or_missing_pixels_give_a_reason(tmp_path: Path) -> None:
    paths = labelled_series(tmp_path / "ct", slices=3)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PreviewUnavailable, match="JPEG Baseline"):
        render_preview(paths, [])
    paths[1].unlink()
    with pytest.raises(PreviewUnavailable, match="no longer in the spool"):
        render_preview(paths, [])


def test_job_preview_from_the_spool_is_cached(receiver, tmp_path: Path) -> None:
    paths = labelled_series(tmp_path / "ct")
    run = storescu(receiver.server.server_address[1], paths)
    assert run.returncode == 0, run.stdout + run.stderr
    settings, db = receiver.settings, receiver.db
    now = utcnow()
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        series_uid = s.scalars(select(Series.series_instance_uid)).one()
        job = Job(
            id="11111111-2222-3333-4444-555555555555",
            study_id=study.id,
            study_version=1,
            rule="ct",
            model="m",
            input_hash="0" * 64,
            created_at=now,
            updated_at=now,
            series_uids=[series_uid],
            summary={
                "series_instance_uid": series_uid,
                "findings": [{"key_slice": 4, "bbox_2d": [20, 24, 29, 33]}],
            },
        )
        s.add(job)
    first = job_preview(settings, db, job.id)
    assert first is not None and not first.placeholder and first.slice_index == 4
    rgb = png(first.png)
    assert abs(float(rgb[OUTPUT_SIZE // 2 + 40, OUTPUT_SIZE // 2 + 40, 0]) - grey(level_of(4))) <= 2
    cached = list((settings.data_dir / "previews").glob("*.png"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.png
    again = job_preview(settings, db, job.id)
    assert (
        again is not None and again.png == first.png and again.slice_index is None
    )  # from the cache

    # A changed result draws a new preview (and replaces the cached one).
    with db.session() as s:
        s.get(Job, job.id).summary = {
            "series_instance_uid": series_uid,
            "findings": [{"key_slice": 1, "bbox_2d": [5, 5, 9, 9]}],
        }
    changed = job_preview(settings, db, job.id)
    assert changed is not None and changed.slice_index == 1 and changed.png != first.png
    assert len(list((settings.data_dir / "previews").glob("*.png"))) == 1

    assert job_preview(settings, db, "no-such-job") is None
    with db.session() as s:
        s.get(Job, job.id).summary = {}
        s.get(Job, job.id).series_uids = []
    empty = job_preview(settings, db, job.id)
    assert empty is not None and empty.placeholder and "no image series" in (empty.reason or "")
    assert not red(png(empty.png)).any()
