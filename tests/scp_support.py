"""Helpers for the receiving-edge tests: what is in the spool and the index, and senders that
can say things pynetdicom's defaults would not (hostile UIDs, mismatched commands)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from sqlalchemy import select

from dicom_node.association_outcome import association_rejection, record_rejection
from dicom_node.spool import TEMP_DIR_NAME
from dicom_node.state import Database, DuplicateEvent, Instance, Series, Study


def dataset_part(path: Path) -> bytes:
    """The bytes of a Part 10 file after its file meta information (group 0002).

    Independent of the node's own parser: follows the (0002,0000) group length.
    """
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not Part 10"
    assert data[132:136] == b"\x02\x00\x00\x00", f"{path} has no file meta group length"
    group_length = struct.unpack("<I", data[140:144])[0]
    return data[144 + group_length :]


def spool_files(data_dir: Path) -> list[Path]:
    """Instances under their final names in the node's spool (temporary files excluded)."""
    spool = Path(data_dir) / "spool"
    if not spool.is_dir():
        return []
    return sorted(
        p for p in spool.rglob("*") if p.is_file() and TEMP_DIR_NAME not in p.relative_to(spool).parts
    )


def temp_files(data_dir: Path) -> list[Path]:
    tmp = Path(data_dir) / "spool" / TEMP_DIR_NAME
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def instance_rows(db_url: str) -> list[Instance]:
    db = Database(db_url)
    try:
        with db.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))
    finally:
        db.dispose()


def index_summary(db_url: str) -> dict[str, Any]:
    """studies -> {series -> {sop instance uids}} from the index, plus duplicate events."""
    db = Database(db_url)
    try:
        with db.session() as s:
            studies = {st.id: st.study_instance_uid for st in s.scalars(select(Study))}
            series = {se.id: (se.series_instance_uid, se.study_id) for se in s.scalars(select(Series))}
            tree: dict[str, dict[str, set[str]]] = {}
            for inst in s.scalars(select(Instance)):
                series_uid, study_id = series[inst.series_id]
                assert inst.study_id == study_id, "instance and its series point at different studies"
                tree.setdefault(studies[inst.study_id], {}).setdefault(series_uid, set()).add(
                    inst.sop_instance_uid
                )
            dups = [
                {"identical": d.identical, "action": d.action, "instance_id": d.instance_id}
                for d in s.scalars(select(DuplicateEvent).order_by(DuplicateEvent.id))
            ]
            counts = {
                st.study_instance_uid: (st.instance_count, st.total_bytes) for st in s.scalars(select(Study))
            }
            return {"tree": tree, "duplicates": dups, "study_counts": counts}
    finally:
        db.dispose()


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root`` (files, folders, links) with its type and size."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "link" if p.is_symlink() else ("dir" if p.is_dir() else "file")
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else 0)
    return out


@contextmanager
def lenient_uids() -> Iterator[None]:
    """Let this process's pynetdicom put any UID on the wire (a hostile sender's view)."""
    saved = dict(_config.VALIDATORS)
    saved_enforce = _config.ENFORCE_UID_CONFORMANCE
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    _config.ENFORCE_UID_CONFORMANCE = False
    try:
        yield
    finally:
        _config.VALIDATORS.clear()
        _config.VALIDATORS.update(saved)
        _config.ENFORCE_UID_CONFORMANCE = saved_enforce


def store_datasets(
    port: int,
    datasets: list[Dataset],
    *,
    called: str = "AINODE",
    calling: str = "TESTSCU",
) -> list[int | None]:
    """C-STORE in-memory datasets over one association; the statuses (None = no response)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def store_files(
    port: int,
    paths: list[Path],
    *,
    called: str = "AINODE",
    calling: str = "TESTSCU",
    timeout: float = 20,
    statuses: list[int | None] | None = None,
) -> list[int | None]:
    """C-STORE files exactly as they are on disk (pynetdicom streams the dataset bytes).

    The command's Affected SOP Class/Instance UIDs come from each file's meta information,
    the data set from the bytes after it: a file whose meta disagrees with its data set makes
    the command disagree with the data set. ``timeout`` is the client's ACSE, DIMSE and network
    timeout. Each status is appended to ``statuses`` (when given) as it arrives, so a caller
    running this in a thread sees the answers so far even if a later store never returns.
    """
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        metas = [read_file_meta_info(p) for p in paths]
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for pair in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
            ae.add_requested_context(pair[0], [pair[1]])
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association refused"
        if statuses is None:
            statuses = []
        try:
            for p in paths:
                rsp = assoc.send_c_store(p)
                statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


def read_stored(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True)


@contextmanager
def running_receiver(settings: Any) -> Iterator[Any]:
    """An in-process storage SCP with the given settings (like the ``receiver`` fixture)."""
    from dicom_node.scp.server import Receiver
    from dicom_node.state import open_database

    db = open_database(settings.resolved_database_url)
    rcv = Receiver(settings, db, reuse_port=False)
    rcv.start()
    try:
        yield rcv
    finally:
        rcv.stop(grace=2)
        db.dispose()


def associate(
    port: int, *, calling: str = "TESTSCU", called: str = "AINODE", bind: tuple[str, int] | None = None
) -> Any:
    """A pynetdicom association proposing Verification and CT Image Storage (from the local
    address ``bind`` when given: any 127.x.y.z is loopback on Linux)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    handlers: list[Any] = [(evt.EVT_PDU_RECV, record_rejection)]
    if bind is None:
        return ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=handlers)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=bind, evt_handlers=handlers)


def rejection(assoc: Any) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ the node sent, or None when it sent
    none: read as the node's own SCU reads a peer's (:func:`dicom_node.association_outcome.association_rejection`,
    from the PDU itself where pynetdicom 3.0 ends a fast rejection as an abort; about 1
    association in 200 against the node's pre-association gate, :mod:`dicom_node.scp.gate`)."""
    return association_rejection(assoc)


# -- a peer scripted at the wire (hostile-peer tests) ---------------------------------------------

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
A_RELEASE_RQ = bytes.fromhex("05 00 00000004 00000000")


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(
    *,
    calling: str = "HOSTILE",
    called: str = "AINODE",
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU encoded by hand from PS3.8 9.3.2 (not by pynetdicom)."""
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, transfers in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, ts.encode()) for ts in transfers)
        items += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.99"))
    body = struct.pack(">HH16s16s32s", 1, 0, called.ljust(16).encode(), calling.ljust(16).encode(), bytes(32))
    body += items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def p_data(context_id: int, fragment: bytes, *, command: bool, last: bool = True) -> bytes:
    """A P-DATA-TF PDU carrying one PDV (PS3.8 9.3.5, E.2)."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


class WirePeer:
    """A TCP peer that sends exactly the bytes a test gives it, from a chosen loopback address."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def read_pdu(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """(type, whole PDU) of the next PDU; None when the node closed the connection."""
        self.sock.settimeout(timeout)
        header = self._exactly(6)
        if header is None:
            return None
        (length,) = struct.unpack(">I", header[2:6])
        body = self._exactly(length)
        return None if body is None else (header[0], header + body)

    def associate(self, **kw: Any) -> bytes:
        """Send an A-ASSOCIATE-RQ and return the A-ASSOCIATE-AC (fails on anything else)."""
        self.send(associate_rq(**kw))
        answer = self.read_pdu()
        assert answer is not None and answer[0] == 0x02, f"no A-ASSOCIATE-AC: {answer!r}"
        return answer[1]

    def seconds_until_closed(self, timeout: float) -> float:
        """Discard what the node sends until it closes; how long that took (fails after
        ``timeout``)."""
        import time

        start = time.monotonic()
        self.sock.settimeout(0.2)
        while time.monotonic() - start < timeout:
            try:
                if not self.sock.recv(65536):
                    return time.monotonic() - start
            except TimeoutError:
                continue
            except ConnectionResetError:
                return time.monotonic() - start
        raise AssertionError(f"the node kept the connection open for {timeout} s")

    def close(self) -> None:
        self.sock.close()


def abort_pdu(source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak) and Threads of a process, from /proc/PID/status (KiB; threads)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out
