"""Hostile and malformed input: honest failure statuses, nothing written outside the data
directory, and a listener that keeps serving; hostile peers at the wire (oversized and garbage
PDUs, slow and half-open connections, floods) within bounded memory, threads and time."""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
from tests.peers import NodeProcess, storescu, wait_until
from tests.scp_support import (
    A_RELEASE_RQ,
    WirePeer,
    abort_pdu,
    associate,
    associate_rq,
    index_summary,
    instance_rows,
    lenient_uids,
    memory_kib,
    p_data,
    rejection,
    running_receiver,
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


# -- hostile peers at the wire (issue 19): memory, threads and time stay bounded -----------------
#
# One `dicom-node serve` (two receiver processes, short timeouts, small caps) serves every test
# below; each checks, during and after the attack, that each receiver stays under RSS_BOUND (peak
# included) and alive, and that a real DCMTK storescu still stores a study afterwards.

RSS_BOUND_KIB = 300 * 1024
ACSE_TIMEOUT = 2.0
NETWORK_TIMEOUT = 3.0
MAX_CONNECTIONS = 24
MAX_PER_HOST = 16
MAX_ASSOCIATIONS = 8
HOSTILE_ENV = {
    "DICOM_NODE_SCP__RECEIVERS": "2",
    "DICOM_NODE_SCP__ACSE_TIMEOUT": str(ACSE_TIMEOUT),
    "DICOM_NODE_SCP__NETWORK_TIMEOUT": str(NETWORK_TIMEOUT),
    "DICOM_NODE_SCP__DIMSE_TIMEOUT": "10",
    "DICOM_NODE_SCP__MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
    "DICOM_NODE_SCP__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "DICOM_NODE_SCP__MAX_CONNECTIONS_PER_HOST": str(MAX_PER_HOST),
    "DICOM_NODE_SCP__MIN_FREE_BYTES": "0",
    "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0",
}
INVALID_PARAMETER = abort_pdu(0x02, 0x06)
UNRECOGNIZED_PDU = abort_pdu(0x02, 0x01)


def receiver_pids(node: NodeProcess) -> list[int]:
    """The receiver processes (multiprocessing spawn children) of a ``serve`` process."""
    assert node.proc is not None
    out = subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True, check=False)
    pids = [int(p) for p in out.stdout.split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


class Hostile:
    """The shared node, with the checks every hostile test ends with."""

    def __init__(self, node: NodeProcess, study: list[Path]) -> None:
        self.node = node
        self.port = node.dicom_port
        self.study = study
        self.pids = receiver_pids(node)
        assert len(self.pids) == 2, self.pids
        self.peaks: dict[str, int] = {}

    def check_memory(self, label: str) -> None:
        """Every receiver is alive and under the bound, now and at its peak so far."""
        assert self.node.proc is not None and self.node.proc.poll() is None, self.node.log()[-3000:]
        for pid in self.pids:
            mem = memory_kib(pid)  # raises when the receiver is gone
            assert mem["VmHWM"] < RSS_BOUND_KIB, (label, pid, mem)
            self.peaks[label] = max(self.peaks.get(label, 0), mem["VmHWM"])
            print(f"[{label}] receiver {pid}: VmRSS {mem['VmRSS'] // 1024} MiB, "
                  f"VmHWM {mem['VmHWM'] // 1024} MiB, {mem['Threads']} threads")

    @contextmanager
    def sampling(self) -> Iterator[dict[int, int]]:
        """Peak thread count of each receiver while the block runs (sampled every 20 ms)."""
        peaks = dict.fromkeys(self.pids, 0)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for pid in self.pids:
                    peaks[pid] = max(peaks[pid], memory_kib(pid)["Threads"])
                done.wait(0.02)

        thread = threading.Thread(target=sample)
        thread.start()
        try:
            yield peaks
        finally:
            done.set()
            thread.join()

    def check_still_serving(self, label: str) -> None:
        self.check_memory(label)
        # The threads of just-aborted peers end within STOP_CHECK_SECONDS of their close, and
        # until then still count against the association limits: a sender that is refused
        # "transient, local limit exceeded" retries, as a modality does.
        deadline = time.monotonic() + 5
        while True:
            result = storescu(self.port, self.study)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            if "Local Limit Exceeded" not in result.stderr:
                break
            time.sleep(0.3)
        assert result.returncode == 0, result.stderr + self.node.log()[-3000:]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    node = NodeProcess(root / "var", HOSTILE_ENV).start()
    try:
        yield Hostile(node, ct_series(root / "study", slices=3, size=16))
    finally:
        assert node.stop() == 0, node.log()[-3000:]


def _until_closed(peers: list[WirePeer], timeout: float) -> list[float]:
    with ThreadPoolExecutor(max_workers=len(peers)) as pool:
        return list(pool.map(lambda p: p.seconds_until_closed(timeout), peers))


def test_announced_4gib_pdus_are_aborted_before_anything_is_allocated(hostile: Hostile) -> None:
    """Six connections announcing 4 GiB PDUs (the reproduction in issue 19) each get an A-ABORT
    (invalid PDU parameter value) and a close; no receiver grows."""
    for header in ("0100ffffffff", "0400ffffffff", "0200ffffffff"):
        peers = [WirePeer(hostile.port) for _ in range(6)]
        for peer in peers:
            peer.send(bytes.fromhex(header))
        for peer in peers:
            assert peer.read_pdu() == (0x07, INVALID_PARAMETER)
            assert peer.read_pdu() is None  # and closed
            peer.close()
    hostile.check_still_serving("4 GiB announced")


LOCAL_LIMIT_EXCEEDED = bytes.fromhex("0300000000040002 0302".replace(" ", ""))
"""A-ASSOCIATE-RJ transient, service provider (presentation), local limit exceeded."""


def _answer_to(hostile: Hostile, data: bytes) -> tuple[WirePeer, tuple[int, bytes] | None]:
    """Send ``data`` on a new connection and read the answer. The threads of peers aborted just
    before still count against the per-host limit for a moment (see ``check_still_serving``):
    a "local limit exceeded" rejection is tried again, as a modality would, for up to 5 s."""
    deadline = time.monotonic() + 5
    while True:
        peer = WirePeer(hostile.port)
        peer.send(data)
        answer = peer.read_pdu()
        if answer != (0x03, LOCAL_LIMIT_EXCEEDED) or time.monotonic() > deadline:
            return peer, answer
        peer.close()
        time.sleep(0.3)


def test_unknown_pdu_types_are_aborted_as_unrecognized(hostile: Hostile) -> None:
    for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes.fromhex("0000000000040000"),
                    bytes.fromhex("08000000000400000000"), b"\xff" * 64, b"\x16\x03\x01\x02\x00\x01" + bytes(512)):  # TLS hello
        peer, answer = _answer_to(hostile, garbage)
        assert answer == (0x07, UNRECOGNIZED_PDU), garbage
        assert peer.read_pdu() is None
        peer.close()
    # fixed-length PDUs of another length, and an undecodable association request
    for bad in (bytes.fromhex("0500 00000100") + bytes(256), bytes.fromhex("0100 00000010") + b"\x01" * 16):
        peer, answer = _answer_to(hostile, bad)
        assert answer is not None and answer[0] == 0x07, bad
        assert peer.read_pdu() is None
        peer.close()
    hostile.check_still_serving("garbage types")


def test_silent_and_truncated_peers_are_dropped_at_the_acse_timeout(hostile: Hostile) -> None:
    """Nothing, half a header, or a header and part of a request: closed by the node after the
    ACSE timeout (the ARTIM timer of PS3.8 9.1.5), not held for ever."""
    rq = associate_rq()
    starts = [b"", b"\x01\x00\x00", rq[:6], rq[: len(rq) // 2]]
    peers = [WirePeer(hostile.port) for _ in starts]
    for peer, start in zip(peers, starts, strict=True):
        if start:
            peer.send(start)
    waited = _until_closed(peers, ACSE_TIMEOUT + 10)
    print(f"truncated peers closed after {[round(w, 2) for w in waited]} s")
    assert all(ACSE_TIMEOUT - 0.5 < w < ACSE_TIMEOUT + 4 for w in waited), waited
    hostile.check_still_serving("truncated")


def test_slow_loris_is_dropped_before_and_after_association(hostile: Hostile) -> None:
    """A byte every 0.4 s: an association request never completes (ACSE timeout); inside an
    association, a P-DATA PDU never completes (network timeout)."""
    before = WirePeer(hostile.port)
    after = WirePeer(hostile.port)
    after.associate()
    rq = associate_rq()
    pdata = p_data(1, b"\x00" * 200, command=True)
    stop = threading.Event()

    def trickle(peer: WirePeer, data: bytes) -> None:
        for byte in data:
            if stop.is_set():
                return
            try:
                peer.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.4)

    threads = [threading.Thread(target=trickle, args=a) for a in ((before, rq), (after, pdata))]
    for t in threads:
        t.start()
    try:
        waited = _until_closed([before, after], NETWORK_TIMEOUT + 10)
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f"slow loris closed after {[round(w, 2) for w in waited]} s")
    assert ACSE_TIMEOUT - 0.5 < waited[0] < ACSE_TIMEOUT + 4, waited
    assert NETWORK_TIMEOUT - 0.5 < waited[1] < NETWORK_TIMEOUT + 4, waited
    hostile.check_still_serving("slow loris")


def test_p_data_larger_than_our_maximum_is_aborted(hostile: Hostile) -> None:
    """After a valid association, a P-DATA-TF longer than the 128 KiB we advertised (or 4 GiB)
    gets an A-ABORT (invalid PDU parameter value); one of exactly 128 KiB is fine."""
    from dicom_node.settings import DEFAULT_MAX_PDU

    for length in (DEFAULT_MAX_PDU + 1, 0xFFFFFFFF):
        peer = WirePeer(hostile.port)
        peer.associate()
        peer.send(struct.pack(">BBI", 0x04, 0, length) + bytes(1000))
        assert peer.read_pdu() == (0x07, INVALID_PARAMETER)
        assert peer.read_pdu() is None
        peer.close()
    peer = WirePeer(hostile.port)
    peer.associate()
    # a whole-size PDU: one PDV (an incomplete command fragment) filling exactly 128 KiB
    peer.send(p_data(1, bytes(DEFAULT_MAX_PDU - 6), command=True, last=False))
    peer.send(A_RELEASE_RQ)
    assert peer.read_pdu() != (0x07, INVALID_PARAMETER)  # whatever else it makes of it
    peer.close()
    hostile.check_still_serving("oversized P-DATA")


def test_200_half_open_connections_are_capped_and_dropped(hostile: Hostile) -> None:
    """200 connections that never associate: those over the caps are refused on accept with
    an A-ASSOCIATE-RJ (transient, local limit exceeded); the rest are closed at the ACSE
    timeout. Threads stay bounded by the caps, not by the attack."""
    refused = 0
    with hostile.sampling() as threads:
        with ThreadPoolExecutor(max_workers=20) as pool:
            peers = list(pool.map(lambda _: WirePeer(hostile.port, timeout=20), range(200)))
        for i, peer in enumerate(peers):
            if i % 2:
                peer.send(b"\x01\x00")  # half a header
        start = time.monotonic()
        for peer in peers:
            try:
                answer = peer.read_pdu(timeout=ACSE_TIMEOUT + 10)
            except TimeoutError:
                raise AssertionError("a connection was kept past the ACSE timeout") from None
            if answer is not None:
                assert answer == (0x03, bytes.fromhex("03000000000400020302")), answer
                refused += 1
            peer.close()
            if refused == 100:
                hostile.check_memory("200 half-open")
    elapsed = time.monotonic() - start
    print(f"200 half-open: {refused} refused on accept, all closed within {elapsed:.1f} s; "
          f"peak threads per receiver: {threads}")
    assert refused >= 200 - 2 * MAX_CONNECTIONS
    # each admitted connection costs a DUL and an association thread; ~20 threads of its own
    assert all(n <= 2 * MAX_CONNECTIONS + 30 for n in threads.values()), threads
    hostile.check_still_serving("200 half-open")


def test_association_request_flood(hostile: Hostile) -> None:
    """300 A-ASSOCIATE-RQs from 20 concurrent peers: every one is answered (accepted, or
    rejected as transient when over a limit), none hangs, and the node keeps serving."""
    answers: Counter[str] = Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        peer = WirePeer(hostile.port, timeout=15)
        try:
            peer.send(associate_rq(calling=f"FLOOD{i % 7}"))
            answer = peer.read_pdu(timeout=15)
            kind = {0x02: "accepted", 0x03: "rejected"}.get(answer[0], "other") if answer else "closed"
            if kind == "accepted" and i % 2:
                peer.send(A_RELEASE_RQ)
                kind += "+released" if (peer.read_pdu(timeout=15) or (0,))[0] == 0x06 else "+?"
        finally:
            peer.close()
        with lock:
            answers[kind] += 1

    start = time.monotonic()
    with hostile.sampling() as threads, ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(one, range(300)))
    elapsed = time.monotonic() - start
    hostile.check_memory("flood")
    print(f"300 association requests in {elapsed:.1f} s: {dict(answers)}; "
          f"peak threads per receiver: {threads}")
    assert all(n <= 2 * MAX_CONNECTIONS + 30 for n in threads.values()), threads
    assert elapsed < 60
    assert sum(answers.values()) == 300
    assert set(answers) <= {"accepted", "accepted+released", "rejected"}, answers
    hostile.check_still_serving("flood")


def test_the_per_address_cap_refuses_one_peer_but_not_another(make_settings: Any, sqlite_url: str) -> None:
    """Three open connections from 127.0.0.1 use its share: the fourth is rejected (transient,
    local limit exceeded) while 127.0.0.2 still associates; the global cap then holds too."""
    settings = make_settings(
        database_url=sqlite_url,
        scp={"receivers": 1, "max_connections_per_host": 3, "max_connections": 6,
             "max_associations": 6, "acse_timeout": 20},
    )
    with running_receiver(settings) as rcv:
        port = _port(rcv)
        local = [WirePeer(port) for _ in range(3)]
        wait_until(lambda: rcv.gate.open == 3, 10, message="three connections admitted")
        assert rejection(associate(port)) == (0x02, 0x03, 0x02)
        other = associate(port, bind=("127.0.0.2", 0))
        assert other.is_established and int(other.send_c_echo().Status) == 0
        others = [WirePeer(port, source="127.0.0.3") for _ in range(2)]  # 3 + 1 + 2 = 6 open
        wait_until(lambda: rcv.gate.open == 6, 10, message="six connections admitted")
        assert rejection(associate(port, bind=("127.0.0.4", 0))) == (0x02, 0x03, 0x02)
        other.release()
        for peer in local + others:
            peer.close()
        wait_until(lambda: rcv.gate.open == 0, 10, message="connections given back")
        again = associate(port)
        assert again.is_established
        again.release()


def test_a_full_spool_refuses_at_the_first_fragment_without_writing(settings_for_hostile: Any, tmp_path: Path) -> None:
    """Below the free-space floor a 20 MB instance is refused (A700) without being buffered or
    spilled to disk first: nothing is created in the spool's temporary area."""
    free = shutil.disk_usage(tmp_path).free
    big = ct_series(tmp_path / "big", slices=1, size=3200)  # ~20 MB: would spill at 8 MiB
    with running_receiver(settings_for_hostile(min_free_bytes=free + 2**40)) as rcv:
        tmp = rcv.spool.tmp
        before = tmp.stat().st_mtime_ns
        assert store_files(_port(rcv), big) == [0xA700]
        assert tmp.stat().st_mtime_ns == before, "a temporary file came and went"
        assert temp_files(rcv.settings.data_dir) == []


@pytest.fixture
def settings_for_hostile(make_settings: Any, sqlite_url: str) -> Any:
    def build(**scp: Any) -> Any:
        return make_settings(database_url=sqlite_url, scp={"receivers": 1, **scp})

    return build


def test_sigterm_stops_the_node_with_hostile_connections_open(tmp_path: Path) -> None:
    """Silent, half-header, 4 GiB-announcing and slow-loris peers (default 30 s ACSE and 60 s
    network timeouts) do not keep ``serve`` from stopping on SIGTERM."""
    node = NodeProcess(tmp_path / "var", {"DICOM_NODE_SCP__RECEIVERS": "2",
                                          "DICOM_NODE_WORKER__EMBEDDED_WORKERS": "0"}).start()
    try:
        peers = [WirePeer(node.dicom_port) for _ in range(12)]
        for i, peer in enumerate(peers):
            if i % 4 == 1:
                peer.send(b"\x01\x00\x00")
            elif i % 4 == 2:
                peer.send(bytes.fromhex("0100ffffffff"))
            elif i % 4 == 3:
                peer.associate()
                peer.send(p_data(1, b"\x00" * 100, command=True)[:20])  # half a P-DATA
        time.sleep(0.5)
        assert node.proc is not None
        start = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.proc.wait(timeout=40)
        elapsed = time.monotonic() - start
        print(f"serve stopped {elapsed:.1f} s after SIGTERM with 12 hostile connections open")
        assert code == 0, node.log()[-3000:]
        # under the 10 s grace for running associations: nothing was in flight on any of them
        assert elapsed < 9
        for peer in peers:
            peer.close()
    finally:
        node.kill()
