"""Validate-and-store below the network: the path C-STORE and STOW-RS share.

Covers what a DICOM association cannot easily carry: a sender's own preamble (STOW-RS delivers
whole files), deflate bombs, a state database that fails mid-store, and the receive sink that
pynetdicom writes into.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from dicom_node.ingest import Ingestor
from dicom_node.scp.incoming import SPILL_BYTES, IncomingDataset
from dicom_node.spool import Spool
from dicom_node.state import open_database
from tests.dicomgen import ct_series
from tests.scp_support import dataset_part, instance_rows, spool_files, temp_files

PE_PREAMBLE = (b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"PE\x00\x00" * 32)[:128]


@pytest.fixture
def ingestor(make_settings: Callable[..., Any], database_url: str) -> Iterator[Ingestor]:
    settings = make_settings(
        database_url=database_url, scp={"min_free_bytes": 0, "max_instance_bytes": 4 * 2**20}
    )
    db = open_database(settings.resolved_database_url)
    spool = Spool(settings.spool_dir, fsync=True)
    spool.prepare()
    try:
        yield Ingestor(settings, db, spool)
    finally:
        db.dispose()


def _with_pe_preamble(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[:128] = PE_PREAMBLE
    return bytes(data)


def test_ingest_file_zeroes_a_pe_preamble(ingestor: Ingestor, tmp_path: Path) -> None:
    (src,) = ct_series(tmp_path / "s", slices=1, size=32)
    temp = ingestor.spool.new_temp_path()
    temp.write_bytes(_with_pe_preamble(src))
    result = ingestor.ingest_file(temp, calling_ae_title=None, source="stow")
    assert result.ok, result
    (stored,) = spool_files(ingestor.settings.data_dir)
    assert stored.read_bytes()[:128] == bytes(128)
    assert dataset_part(stored) == dataset_part(src)
    assert not temp.exists()


def test_ingest_bytes_zeroes_a_pe_preamble(ingestor: Ingestor, tmp_path: Path) -> None:
    (src,) = ct_series(tmp_path / "s", slices=1, size=32)
    result = ingestor.ingest_bytes(bytearray(_with_pe_preamble(src)), calling_ae_title="X")
    assert result.ok, result
    (stored,) = spool_files(ingestor.settings.data_dir)
    assert stored.read_bytes()[:128] == bytes(128)
    assert dataset_part(stored) == dataset_part(src)
    (row,) = instance_rows(ingestor.settings.resolved_database_url)
    assert row.calling_ae_title == "X" and row.size == stored.stat().st_size
    assert temp_files(ingestor.settings.data_dir) == []


def test_not_part10_is_c000(ingestor: Ingestor) -> None:
    result = ingestor.ingest_bytes(bytearray(b"\x00" * 200), calling_ae_title=None)
    assert result.status == 0xC000
    temp = ingestor.spool.new_temp_path()
    temp.write_bytes(b"hello")
    assert ingestor.ingest_file(temp, calling_ae_title=None).status == 0xC000
    assert not temp.exists()


def _deflated_file(path: Path, inflated: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(inflated) + compressor.flush()
    with path.open("wb") as fh:
        fh.write(bytes(128) + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(body)
    return path


def test_deflate_bomb_is_refused_before_it_is_inflated(ingestor: Ingestor, tmp_path: Path) -> None:
    # 64 MiB of an element value (OB) compressing to ~64 KiB; the cap is 4 MiB
    import struct

    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, 64 * 2**20)
    path = _deflated_file(tmp_path / "bomb.dcm", element + bytes(64 * 2**20))
    assert path.stat().st_size < 200_000
    result = ingestor.ingest_bytes(bytearray(path.read_bytes()), calling_ae_title=None)
    assert result.status == 0xA700
    assert "inflates beyond" in (result.reason or "")
    assert (
        spool_files(ingestor.settings.data_dir) == []
        and temp_files(ingestor.settings.data_dir) == []
    )


def test_index_failure_is_a700_and_revokes_the_placed_file(
    ingestor: Ingestor, tmp_path: Path
) -> None:
    """A state database that fails mid-store (here: its table is gone) must not leave a file
    the index does not know (dcm4chee revokes storage the same way)."""
    paths = ct_series(tmp_path / "s", slices=2, size=32)
    assert ingestor.ingest_bytes(bytearray(paths[0].read_bytes()), calling_ae_title=None).ok
    with ingestor.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE duplicate_events")
        conn.exec_driver_sql("DROP TABLE instances")
    result = ingestor.ingest_bytes(bytearray(paths[1].read_bytes()), calling_ae_title=None)
    assert result.status == 0xA700
    assert result.reason == "state database unavailable"
    assert len(spool_files(ingestor.settings.data_dir)) == 1  # only the first, acknowledged one
    assert temp_files(ingestor.settings.data_dir) == []


# -- the receive sink ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _sink_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is process-wide (set by each receiver that starts); pin it for these tests."""
    monkeypatch.setattr(IncomingDataset, "max_bytes", 2**40)


def test_sink_keeps_small_datasets_in_memory(tmp_path: Path) -> None:
    sink = IncomingDataset(str(tmp_path))
    for _ in range(10):
        sink.write(b"x" * 1000)
        sink.file.flush()
    assert sink.in_memory and sink.size == 10_000 and len(sink.buffer) == 10_000
    assert not Path(sink.name).exists()
    sink.close()


def test_sink_spills_large_datasets_to_disk_with_bounded_memory(tmp_path: Path) -> None:
    sink = IncomingDataset(str(tmp_path))
    chunk = b"y" * 131072
    written = 0
    while written <= SPILL_BYTES + len(chunk):
        sink.write(chunk)
        written += len(chunk)
        assert len(sink.buffer) <= SPILL_BYTES + len(chunk)
    assert sink.spilled and len(sink.buffer) == 0
    sink.close()
    assert Path(sink.name).stat().st_size == written == sink.size
    sink.discard()
    assert not Path(sink.name).exists()


def test_sink_records_write_errors_instead_of_raising(tmp_path: Path) -> None:
    sink = IncomingDataset(str(tmp_path / "missing-dir"))
    chunk = b"z" * 2**20
    for _ in range(SPILL_BYTES // len(chunk) + 3):
        assert sink.write(chunk) == len(chunk)  # never raises into pynetdicom
    assert isinstance(sink.error, FileNotFoundError)
    assert sink.buffer == bytearray()


def test_sink_caps_the_size_and_drops_what_it_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(IncomingDataset, "max_bytes", SPILL_BYTES + 10)
    sink = IncomingDataset(str(tmp_path))
    sink.write(b"a" * (SPILL_BYTES + 5))
    assert sink.spilled and Path(sink.name).exists()
    sink.write(b"b" * 10)
    assert sink.oversize
    assert not Path(sink.name).exists() and sink.buffer == bytearray()
    sink.write(b"c" * 100)  # the rest of the message is drained
    sink.close()


@pytest.mark.parametrize(
    "sop", ["1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16", "1.2.3", "1.22", "2.25." + "9" * 59]
)
def test_fast_file_meta_is_byte_identical_to_pydicoms(sop: str) -> None:
    import io

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from dicom_node.scp.incoming import _create_file_meta, encode_file_meta

    kw = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": sop,
        "transfer_syntax": "1.2.840.10008.1.2.4.90",
    }
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(**kw))
    assert encode_file_meta(_create_file_meta(**kw)) == expected.getvalue()


@pytest.mark.parametrize("relative", ["../x", "/etc/x", "a/../../x", "", "."])
def test_spool_refuses_paths_outside_itself(tmp_path: Path, relative: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        spool.path(relative)
    with pytest.raises(ValueError):
        Spool.relative_path("ABC", "12")  # keys are lowercase hex, nothing else
    assert spool.path("ab/cd.dcm") == tmp_path / "spool" / "ab" / "cd.dcm"


def test_sqlite_fast_path_stores_what_the_core_path_stores(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    """The first instance of a series goes through SQLAlchemy Core (new study and series); the
    next ones through the DB-API fast path. Both must leave the same kind of values: the same
    timestamp text, booleans as integers, counts and sizes added up."""
    import sqlite3

    settings = make_settings(scp={"min_free_bytes": 0, "fsync": False})
    db = open_database(settings.resolved_database_url)
    spool = Spool(settings.spool_dir, fsync=False)
    spool.prepare()
    try:
        ingestor = Ingestor(settings, db, spool)
        paths = ct_series(tmp_path / "s", slices=3, size=32)
        for path in paths:
            result = ingestor.ingest_bytes(bytearray(path.read_bytes()), calling_ae_title="CT\x00A")
            assert result.ok, result
        database = db.engine.url.database
    finally:
        db.dispose()
    assert database
    with contextlib.closing(sqlite3.connect(database)) as con:
        rows = con.execute(
            "SELECT received_at, typeof(received_at), calling_ae_title, size, source, sha256"
            " FROM instances ORDER BY id"
        ).fetchall()
        (study,) = con.execute(
            "SELECT instance_count, total_bytes, last_received_at, dirty, typeof(dirty)"
            " FROM studies"
        ).fetchall()
        (series,) = con.execute("SELECT instance_count, modality FROM series").fetchall()
    assert len(rows) == 3
    for received_at, kind, calling, size, source, sha in rows:
        assert kind == "text" and re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", received_at
        )
        assert (calling, source, len(sha)) == ("CTA", "dimse", 64)
        assert size > 0
    assert study == (3, sum(r[3] for r in rows), rows[-1][0], 1, "integer")
    assert series == (3, "CT")
