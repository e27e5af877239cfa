"""Hostile and malformed input: honest failure statuses, nothing written outside the data
directory, and a listener that keeps serving (reliability.md §1.1, scenarios A6-A8, E1, E3, E8)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.dicomgen import ct_series
from tests.peers import NodeProcess, storescu
from tests.scp_support import (
    index_summary,
    instance_rows,
    lenient_uids,
    snapshot,
    spool_files,
    store_datasets,
    store_files,
    temp_files,
)

HOSTILE_UIDS = {
    "dotdot": "..",
    "dotdot-x": "../x",
    "absolute": "/etc/x",
    "slash": "1.2/3",
    "nul": "1.2\x00.3",
    "backslash": "1.2\\3",
    "65-chars": "1." + "2" * 63,
    "long": "1." + "2" * 100,
}
FAILURE = {0xC000, 0xC001, 0xC002, 0xA900}


def _port(receiver: Any) -> int:
    return int(receiver.server.server_address[1])


def _ct(tmp_path: Path, **kw: Any) -> Dataset:
    (path,) = ct_series(tmp_path / f"ct-{generate_uid()[-8:]}", slices=1, size=16, **kw)
    return dcmread(path)


def _assert_alive(receiver: Any, tmp_path: Path) -> None:
    """The listener still stores a normal instance after the hostile one."""
    ds = _ct(tmp_path)
    assert store_datasets(_port(receiver), [ds]) == [0x0000]


@pytest.fixture
def writes_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pydicom write invalid values (as a hostile sender would)."""
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.IGNORE)


@pytest.mark.parametrize("field", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
@pytest.mark.parametrize("value", HOSTILE_UIDS.values(), ids=HOSTILE_UIDS.keys())
def test_hostile_uid_is_refused_and_writes_nothing_outside_the_data_dir(
    receiver: Any, tmp_path: Path, field: str, value: str, writes_anything: None
) -> None:
    data_dir = receiver.settings.data_dir
    ds = _ct(tmp_path)
    setattr(ds, field, value)
    if field == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = value
    outside = [Path("/etc/x"), tmp_path / "x", data_dir / "x", data_dir / "spool" / "x"]
    assert not any(p.exists() for p in outside)

    def relevant(snap: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
        # the state database's own files change size with every transaction
        return {k: v for k, v in snap.items() if "state.sqlite" not in k}

    if field == "SOPInstanceUID" and "\\" in value:
        # a backslash makes the value multi-valued: no command can carry it, so the command
        # gets a plain UID and the data set the hostile one
        sent = _write_part10(tmp_path / "hostile.dcm", ds, meta_sop_instance="1.2.3.4")
    before = relevant(snapshot(tmp_path))
    with lenient_uids():
        if field == "SOPInstanceUID" and "\\" in value:
            statuses = store_files(_port(receiver), [sent])
        else:
            statuses = store_datasets(_port(receiver), [ds])
    after = relevant(snapshot(tmp_path))

    assert statuses[0] in FAILURE, f"status {statuses[0]!r}"
    if field != "SOPInstanceUID":
        # the command carries only the SOP UIDs: a bad Study/Series UID is ours to catch
        assert statuses[0] == 0xC002
    assert after == before, set(after.items()) ^ set(before.items())
    assert not any(p.exists() for p in outside)
    assert spool_files(data_dir) == [] and temp_files(data_dir) == []
    assert instance_rows(receiver.settings.resolved_database_url) == []
    assert receiver.statuses[statuses[0]] == 1
    _assert_alive(receiver, tmp_path)


def test_overlong_command_uid_from_the_wire_never_gets_success(tmp_path: Path, writes_anything: None) -> None:
    """Against the real ``serve`` process (its pynetdicom validates what arrives): a 100-char
    SOP Instance UID in the command is refused before our handler (pynetdicom aborts the
    association) — no success, nothing stored, and the node keeps serving."""
    node = NodeProcess(tmp_path / "var", {"DICOM_NODE_SCP__RECEIVERS": "1"}).start()
    try:
        ds = _ct(tmp_path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = HOSTILE_UIDS["long"]
        with lenient_uids():
            statuses = store_datasets(node.dicom_port, [ds])
        assert statuses[0] != 0x0000
        good = _ct(tmp_path)
        assert store_datasets(node.dicom_port, [good]) == [0x0000]
        assert [r.sop_instance_uid for r in instance_rows(f"sqlite:///{tmp_path / 'var' / 'state.sqlite'}")] == [
            good.SOPInstanceUID
        ]
    finally:
        assert node.stop() == 0


def _write_part10(path: Path, ds: Dataset, *, meta_sop_instance: str | None = None, meta_sop_class: str | None = None) -> Path:
    """A Part 10 file whose file meta may disagree with its data set."""
    ds.file_meta.MediaStorageSOPInstanceUID = meta_sop_instance or ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = meta_sop_class or ds.SOPClassUID
    with path.open("wb") as fh:
        fh.write(bytes(128) + b"DICM")
        write_file_meta_info(fh, ds.file_meta)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)
        fh.write(buffer.getvalue())
    return path


def test_dataset_and_command_sop_instance_uid_disagree_a900(receiver: Any, tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    path = _write_part10(tmp_path / "mismatch.dcm", ds, meta_sop_instance=generate_uid())
    assert store_files(_port(receiver), [path]) == [0xA900]
    assert instance_rows(receiver.settings.resolved_database_url) == []
    assert spool_files(receiver.settings.data_dir) == []
    _assert_alive(receiver, tmp_path)


def test_dataset_and_command_sop_class_disagree_a900(receiver: Any, tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    mr_storage = "1.2.840.10008.5.1.4.1.1.4"
    path = _write_part10(tmp_path / "mismatch.dcm", ds, meta_sop_class=mr_storage)
    assert store_files(_port(receiver), [path]) == [0xA900]
    assert instance_rows(receiver.settings.resolved_database_url) == []


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_missing_uid_c001(receiver: Any, tmp_path: Path, missing: str) -> None:
    ds = _ct(tmp_path)
    sop = ds.SOPInstanceUID
    delattr(ds, missing)
    path = _write_part10(tmp_path / "missing.dcm", ds, meta_sop_instance=sop)
    assert store_files(_port(receiver), [path]) == [0xC001]
    assert instance_rows(receiver.settings.resolved_database_url) == []
    _assert_alive(receiver, tmp_path)


def _file_with_raw_dataset(path: Path, raw: bytes, sop_class: str, sop_instance: str) -> Path:
    ds = Dataset()
    ds.file_meta = Dataset()  # type: ignore[assignment]
    from pydicom.dataset import FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with path.open("wb") as fh:
        fh.write(bytes(128) + b"DICM")
        write_file_meta_info(fh, meta)
        fh.write(raw)
    return path


def test_unparseable_dataset_c000_and_the_association_goes_on(receiver: Any, tmp_path: Path) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    # an element claiming 0xFFFFFF00 bytes of value in a tiny data set
    garbage = struct.pack("<HH2sH", 0x0008, 0x0016, b"UI", 10) + b"1.2.3.4.5\x00"
    garbage += struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0x10) + b"\xff" * 16
    garbage += struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 0xFFF0) + b"x" * 8
    bad = _file_with_raw_dataset(tmp_path / "bad.dcm", garbage, ct, "1.2.3.4.5")
    good_ds = _ct(tmp_path)
    good = _write_part10(tmp_path / "good.dcm", good_ds)
    statuses = store_files(_port(receiver), [bad, good])
    assert statuses[0] is not None and (statuses[0] & 0xF000) == 0xC000, statuses
    assert statuses[1] == 0x0000
    assert [r.sop_instance_uid for r in instance_rows(receiver.settings.resolved_database_url)] == [
        good_ds.SOPInstanceUID
    ]
    assert temp_files(receiver.settings.data_dir) == []


def _nested_sequence(depth: int) -> bytes:
    """(0040,A730) Content Sequence nested ``depth`` levels, undefined lengths throughout."""
    head = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (head + item) * depth + (item_end + seq_end) * depth


@pytest.mark.parametrize("depth", [70, 300, 3000])
def test_deeply_nested_sequences_are_refused_without_killing_the_listener(
    receiver: Any, tmp_path: Path, depth: int
) -> None:
    base = _ct(tmp_path)
    del base.PixelData
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, base)  # every tag < (0040,A730): the nested sequence goes last
    path = _file_with_raw_dataset(
        tmp_path / "deep.dcm", buffer.getvalue() + _nested_sequence(depth), base.SOPClassUID, base.SOPInstanceUID
    )
    good = _write_part10(tmp_path / "good.dcm", _ct(tmp_path))
    statuses = store_files(_port(receiver), [path, good])
    assert statuses[0] is not None and (statuses[0] & 0xF000) == 0xC000, statuses
    assert statuses[1] == 0x0000
    assert len(instance_rows(receiver.settings.resolved_database_url)) == 1


def test_sequence_nesting_within_the_limit_is_stored(receiver: Any, tmp_path: Path) -> None:
    base = _ct(tmp_path)
    del base.PixelData
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, base)
    path = _file_with_raw_dataset(
        tmp_path / "ok.dcm", buffer.getvalue() + _nested_sequence(20), base.SOPClassUID, base.SOPInstanceUID
    )
    assert store_files(_port(receiver), [path]) == [0x0000]


def test_stored_preamble_is_zeroed_even_when_the_sent_file_had_a_pe_header(receiver: Any, tmp_path: Path) -> None:
    ds = _ct(tmp_path)
    path = _write_part10(tmp_path / "pe.dcm", ds)
    data = bytearray(path.read_bytes())
    data[:128] = (b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + b"PE\x00\x00" * 32)[:128]
    assert len(data) == path.stat().st_size
    path.write_bytes(bytes(data))
    result = storescu(_port(receiver), [path])
    assert result.returncode == 0, result.stderr
    (row,) = instance_rows(receiver.settings.resolved_database_url)
    stored = (receiver.settings.spool_dir / row.path).read_bytes()
    assert stored[:128] == bytes(128)
    assert stored[128:132] == b"DICM"


def test_index_holds_no_patient_data(receiver: Any, tmp_path: Path) -> None:
    """The index is patient-free: the canary name and ID appear nowhere in it."""
    from tests.dicomgen import CANARY_ID, CANARY_NAME

    paths = ct_series(tmp_path / "c", slices=3, size=16)
    assert storescu(_port(receiver), paths).returncode == 0
    url = receiver.settings.resolved_database_url
    summary = index_summary(url)
    assert len(summary["tree"]) == 1
    from sqlalchemy import MetaData, create_engine, select

    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            dump = " ".join(
                str(row) for table in meta.sorted_tables for row in conn.execute(select(table))
            )
    finally:
        engine.dispose()
    for canary in (CANARY_NAME, CANARY_NAME.split("^")[0], CANARY_ID, "19700101"):
        assert canary not in dump
