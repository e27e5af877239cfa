"""Received text the state database refuses: PostgreSQL's ``text`` cannot hold NUL, so a
description with one used to make every store of its series fail with "retry later" (A700) for
ever. Descriptions lose the NUL instead (dicom_node/state/text.py); the file keeps its bytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import select

from dicom_node.state import Database, Series
from dicom_node.state.text import storable_text
from tests.dicomgen import ct_series
from tests.scp_support import (
    dataset_part,
    instance_rows,
    running_receiver,
    spool_files,
    store_files,
)


def test_storable_text_drops_nul_and_lone_surrogates() -> None:
    assert storable_text("CHEST\x00 2MM\x00\x00") == "CHEST 2MM"
    assert storable_text("\x00\x00") is None
    assert storable_text("A\udc80B") == "A\ufffdB"
    assert storable_text("ABCDEF", 3) == "ABC"


def test_nul_in_descriptions_is_stored_without_it(
    make_settings: Callable[..., Any], database_url: str, tmp_path: Path
) -> None:
    paths = ct_series(tmp_path / "s", slices=2, size=32, description="LUNG\x00 1MM")
    for path in paths:  # and a StudyDescription padded with NUL, as some modalities send
        ds = dcmread(path)
        ds.StudyDescription = "CT CHEST\x00\x00"
        ds.save_as(path, enforce_file_format=True)
    assert b"LUNG\x00 1MM" in paths[0].read_bytes()
    settings = make_settings(database_url=database_url, scp={"receivers": 1, "min_free_bytes": 0})
    with running_receiver(settings) as rcv:
        assert store_files(int(rcv.server.server_address[1]), paths) == [0x0000, 0x0000]
    rows = instance_rows(database_url)
    assert len(rows) == 2
    db = Database(database_url)
    try:
        with db.session() as s:
            (series,) = s.scalars(select(Series))
            assert series.series_description == "LUNG 1MM"
            assert series.study_description == "CT CHEST"
            assert series.instance_count == 2
    finally:
        db.dispose()
    # the spooled files are the bytes that were sent, NUL included
    stored = {dataset_part(p) for p in spool_files(settings.data_dir)}
    assert stored == {dataset_part(p) for p in paths}
