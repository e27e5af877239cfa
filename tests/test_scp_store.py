"""The storage SCP receives what real senders send, stores it byte for byte and indexes it.

Senders: DCMTK storescu/echoscu, Orthanc (the node registered as a modality), pynetdicom.
Every test runs against SQLite and PostgreSQL (the ``database_url`` fixture).
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file

from tests.dicomgen import ct_series
from tests.peers import storescu
from tests.scp_support import (
    dataset_part,
    index_summary,
    instance_rows,
    spool_files,
    store_files,
    temp_files,
)


def _assert_stored_as_sent(receiver: Any, sent: list[Path]) -> None:
    """Every sent file is in the spool (dataset bytes identical, preamble zeroed) and indexed."""
    rows = {r.sop_instance_uid: r for r in instance_rows(receiver.settings.resolved_database_url)}
    spool = receiver.settings.spool_dir
    for path in sent:
        ds = dcmread(path, stop_before_pixels=True)
        row = rows.get(str(ds.SOPInstanceUID))
        assert row is not None, f"{path.name} is not indexed"
        stored = spool / row.path
        assert dataset_part(stored) == dataset_part(path), f"{path.name}: stored data set differs"
        assert stored.read_bytes()[:128] == bytes(128)
        assert row.sop_class_uid == str(ds.SOPClassUID)
        assert row.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)
        assert row.size == stored.stat().st_size
        # never a UID in a file name
        assert str(ds.SOPInstanceUID) not in str(stored)
        assert str(ds.StudyInstanceUID) not in str(stored)
    assert len(spool_files(receiver.settings.data_dir)) == len(rows) == len({*rows})


def test_storescu_sends_real_ct_and_generated_study(receiver: Any, real_ct: Path, tmp_path: Path) -> None:
    generated = ct_series(tmp_path / "gen", slices=6, size=64)
    series_dirs = sorted(d for d in real_ct.iterdir() if d.is_dir())
    assert len(series_dirs) >= 2
    sent = generated + [p for d in series_dirs for p in sorted(d.glob("*.dcm"))]
    _, port = receiver.server.server_address[:2]
    result = storescu(port, sent, aet="AINODE")
    assert result.returncode == 0, result.stderr
    _assert_stored_as_sent(receiver, sent)
    summary = index_summary(receiver.settings.resolved_database_url)
    assert len(summary["tree"]) == 3  # two real studies and the generated one
    for study_uid, (count, total) in summary["study_counts"].items():
        assert count == sum(len(v) for v in summary["tree"][study_uid].values())
        assert total > 0
    assert receiver.statuses[0x0000] == len(sent)
    assert temp_files(receiver.settings.data_dir) == []

    echo = subprocess.run(
        ["echoscu", "-aec", "AINODE", "-aet", "ECHOSCU", "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, TCP_NODELAY="1"),
    )
    assert echo.returncode == 0, echo.stderr


def test_orthanc_pushes_a_study_to_the_node(receiver: Any, clean_orthanc: Any, tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "gen", slices=12, size=64)
    (orthanc_study,) = clean_orthanc.upload(paths)
    _, port = receiver.server.server_address[:2]
    clean_orthanc.add_modality("ainode", "AINODE", port)
    assert clean_orthanc.post("/modalities/ainode/echo", json={}).ok
    r = clean_orthanc.post(
        "/modalities/ainode/store", json={"Resources": [orthanc_study], "Synchronous": True}
    )
    assert r.ok, r.text
    rows = instance_rows(receiver.settings.resolved_database_url)
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert {r.sop_instance_uid for r in rows} == sent
    assert {r.calling_ae_title for r in rows} == {"ORTHANC"}
    # Orthanc re-encodes the file meta but not the data set
    _assert_stored_as_sent(receiver, paths)


def _charset(name: str) -> str:
    (path,) = get_charset_files(name)
    return path


ODD_FILES = {
    "big-endian": lambda: get_testdata_file("ExplVR_BigEnd.dcm"),
    "deflated": lambda: get_testdata_file("image_dfl.dcm"),
    "jpeg2000": lambda: get_testdata_file("JPEG2000.dcm"),
    "jpeg2000-lossless-ct": lambda: get_testdata_file("693_J2KR.dcm"),
    "jpeg-ls": lambda: get_testdata_file("MR_small_jpeg_ls_lossless.dcm"),
    "rle-enhanced-mr": lambda: get_testdata_file("emri_small_RLE.dcm"),
    "jpeg-lossless": lambda: get_testdata_file("JPEG-LL.dcm"),
    "jpeg-baseline-utf8": lambda: get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"),
    "jpeg-extended": lambda: get_testdata_file("JPEG-lossy.dcm"),
    "seg-multiframe": lambda: get_testdata_file("liver.dcm"),
    "charset-japanese": lambda: _charset("chrH31.dcm"),
    "charset-russian": lambda: _charset("chrRuss.dcm"),
    "charset-arabic": lambda: _charset("chrArab.dcm"),
    "charset-korean": lambda: _charset("chrKoreanMulti.dcm"),
    "charset-utf8": lambda: _charset("chrX1.dcm"),
    "charset-greek": lambda: _charset("chrGreek.dcm"),
}


def test_odd_files_are_received_as_is_and_indexed(receiver: Any, tmp_path: Path) -> None:
    """Every odd transfer syntax / character set / multi-frame file, sent as its bytes."""
    paths = []
    for name, get in ODD_FILES.items():
        src = get()
        assert src, f"test file for {name} not found (pydicom / pydicom-data installed?)"
        paths.append(Path(src))
    unique = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    assert len(unique) == len(paths), "two sample files share a SOP Instance UID"
    _, port = receiver.server.server_address[:2]
    statuses = store_files(port, list(unique.values()))
    assert statuses == [0x0000] * len(unique), dict(zip([p.name for p in unique.values()], statuses, strict=False))
    _assert_stored_as_sent(receiver, list(unique.values()))
    rows = {r.sop_instance_uid: r for r in instance_rows(receiver.settings.resolved_database_url)}
    frames = {r.number_of_frames for r in rows.values()}
    assert {10, 3} <= frames  # the enhanced MR and the SEG are indexed as multi-frame


def test_storescu_transfer_syntax_flags_travel_as_is(receiver: Any) -> None:
    """storescu proposing a file's compressed syntax (-xw, -xt...): stored in that syntax.

    storescu re-encodes the data set from memory (it may drop group lengths or re-pad), so
    the check is element by element rather than byte for byte; the byte-for-byte check of
    the same files is ``test_odd_files_are_received_as_is_and_indexed``.
    """
    _, port = receiver.server.server_address[:2]
    cases = [
        (get_testdata_file("JPEG2000.dcm"), "-xw"),  # JPEG 2000 (lossy)
        (get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), "-xt"),  # JPEG-LS lossless
        (get_testdata_file("JPEG-LL.dcm"), "-xs"),  # JPEG lossless SV1
        (get_testdata_file("emri_small_RLE.dcm"), "-xr"),  # RLE
        (get_testdata_file("ExplVR_BigEnd.dcm"), "-xb"),  # big endian
        (get_testdata_file("image_dfl.dcm"), "-xd"),  # deflated
    ]
    for done, (path, flag) in enumerate(cases):
        result = storescu(port, [Path(path)], extra=[flag])
        assert result.returncode == 0, (flag, result.stderr)
        rows = {r.sop_instance_uid: r for r in instance_rows(receiver.settings.resolved_database_url)}
        assert len(rows) == done + 1, flag
        sent = dcmread(path)
        row = rows[str(sent.SOPInstanceUID)]
        stored = dcmread(receiver.settings.spool_dir / row.path)
        assert row.transfer_syntax_uid == str(sent.file_meta.TransferSyntaxUID), flag
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, flag
        assert stored.PixelData == sent.PixelData, flag
        for elem in sent:
            # DCMTK drops group lengths and data set trailing padding when it re-encodes
            if elem.tag.group > 0x0002 and elem.tag not in (0x7FE00010, 0xFFFCFFFC) and elem.tag.element != 0:
                assert stored[elem.tag].value == elem.value, (flag, elem.tag)


def test_interleaved_studies_over_concurrent_associations_do_not_mix(receiver: Any, tmp_path: Path) -> None:
    a = ct_series(tmp_path / "a", slices=16, size=32, seed=1)
    b = ct_series(tmp_path / "b", slices=16, size=32, seed=2)
    # four associations, each carrying alternating instances of both studies
    chunks = [[x for pair in zip(a[i::4], b[i::4], strict=True) for x in pair] for i in range(4)]
    _, port = receiver.server.server_address[:2]
    results: list[list[int | None]] = [[] for _ in chunks]

    def send(i: int) -> None:
        results[i] = store_files(port, chunks[i], calling=f"MOD{i}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r == [0x0000] * 8 for r in results), results
    tree = index_summary(receiver.settings.resolved_database_url)["tree"]

    def expected(paths: list[Path]) -> tuple[str, str, set[str]]:
        dss = [dcmread(p, stop_before_pixels=True) for p in paths]
        return str(dss[0].StudyInstanceUID), str(dss[0].SeriesInstanceUID), {str(d.SOPInstanceUID) for d in dss}

    for paths in (a, b):
        study, series, sops = expected(paths)
        assert tree[study] == {series: sops}
    assert len(tree) == 2
    _assert_stored_as_sent(receiver, a + b)


def test_many_files_go_over_one_association(receiver: Any, tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "s", slices=30, size=32)
    _, port = receiver.server.server_address[:2]
    result = storescu(port, paths)
    assert result.returncode == 0, result.stderr
    assert receiver.associations["accepted"] == 1
    _assert_stored_as_sent(receiver, paths)
