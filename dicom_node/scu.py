"""C-ECHO and C-STORE as a client: used by ``dicom-node send``/``echo`` and by write-back.

Files are sent as they are (no decoding, no transcoding), one presentation context per
(SOP class, transfer syntax) pair, many files per association, TCP_NODELAY on (without it a
DCMTK-based peer stalls ~40 ms per instance on its delayed-ACK timer). Every status is
inspected: pynetdicom returns an empty status on timeout or abort, which counts as failure.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom_node.association_outcome import (
    association_failure,
    association_rejection,
    no_context_accepted,
    record_rejection,
)
from dicom_node.dimse_status import (
    STATUS_NO_RESPONSE,
    STATUS_NOT_SENT,
    STATUS_PENDING,
    STATUS_PENDING_WARNING,
    category,
)
from dicom_node.settings import DEFAULT_MAX_PDU

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 127
"""PS3.8 allows 128 presentation contexts per association; keep one spare."""

# Why an instance got STATUS_NOT_SENT / STATUS_NO_RESPONSE (``SendOutcome.stage``), so that
# callers such as write-back can tell a refused connection from a refused SOP class.
NO_RESPONSE = "no response (timeout or abort)"

STAGE_ASSOCIATE = "associate"
"""Could not connect, or the association was rejected or aborted while negotiating."""
STAGE_CONTEXT = "context"
"""The peer accepted the association but not this SOP class / transfer syntax."""
STAGE_LOST = "lost"
"""The association was lost before this instance could be sent."""
STAGE_LOCAL = "local"
"""The file could not be sent (unreadable or inconsistent on our side)."""
STAGE_RESPONSE = "response"
"""Sent, but no status came back (DIMSE timeout or abort)."""


@dataclass(frozen=True)
class Peer:
    """Where to send: AE title, host, port, and our calling AE title."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "DICOMNODE"
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int
    """DIMSE status, or STATUS_NO_RESPONSE / STATUS_NOT_SENT."""
    detail: str = ""
    stage: str = ""
    """Empty when the peer answered with a status, else one of the ``STAGE_*`` values."""
    rejection: tuple[int, int, int] | None = None
    """A-ASSOCIATE-RJ (result, source, reason) when the peer rejected the association."""

    @property
    def category(self) -> str:
        """success | warning | failure (:func:`dicom_node.dimse_status.category`)."""
        return category(self.status).value


def collect_files(paths: Iterable[Path]) -> tuple[list[DicomFile], list[Path]]:
    """DICOM files under ``paths`` (recursively), and the paths that are not DICOM Part 10."""
    found: list[DicomFile] = []
    skipped: list[Path] = []
    for candidate in _walk(paths):
        try:
            meta = read_file_meta_info(candidate)
            found.append(
                DicomFile(
                    path=candidate,
                    sop_class_uid=str(meta.MediaStorageSOPClassUID),
                    sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                    transfer_syntax_uid=str(meta.TransferSyntaxUID),
                )
            )
        except Exception:
            skipped.append(candidate)
    return found, skipped


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.name.upper() != "DICOMDIR":
                    yield child
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path} does not exist")


def _make_ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    ae.maximum_pdu_size = DEFAULT_MAX_PDU
    return ae


def _associate(ae: AE, peer: Peer) -> Association:
    tls_args = (peer.tls, peer.server_hostname or peer.host) if peer.tls else None
    # pynetdicom reports a refused TCP connection as an abort; remember whether TCP connected
    # so that association_failure() can tell "cannot connect" from "the peer aborted".
    opened: list[bool] = []
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=tls_args,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, lambda event: opened.append(True)),
            (evt.EVT_PDU_RECV, record_rejection),
        ],
    )
    assoc.tcp_connected = bool(opened)  # type: ignore[attr-defined]
    if assoc.is_established:
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def echo(peer: Peer) -> int:
    """C-ECHO the peer; returns the status, raising ``ConnectionError`` if it cannot associate."""
    ae = _make_ae(peer)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        raise ConnectionError(association_failure(assoc))
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp and "Status" in rsp else STATUS_NO_RESPONSE
    finally:
        assoc.release()


def batches(files: list[DicomFile]) -> list[list[DicomFile]]:
    """Split files into association batches of at most MAX_CONTEXTS context pairs each."""
    out: list[list[DicomFile]] = []
    current: list[DicomFile] = []
    pairs: set[tuple[str, str]] = set()
    for f in files:
        pair = (f.sop_class_uid, f.transfer_syntax_uid)
        if pair not in pairs and len(pairs) >= MAX_CONTEXTS:
            out.append(current)
            current, pairs = [], set()
        pairs.add(pair)
        current.append(f)
    if current:
        out.append(current)
    return out


def send_files(
    peer: Peer,
    files: list[DicomFile],
    *,
    on_result: Callable[[SendOutcome], None] | None = None,
) -> list[SendOutcome]:
    """C-STORE ``files`` to ``peer``: one association per batch, every status checked."""
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream from the file; no decode, bounded memory
    outcomes: list[SendOutcome] = []

    def report(outcome: SendOutcome) -> None:
        outcomes.append(outcome)
        if on_result:
            on_result(outcome)

    for batch in batches(files):
        ae = _make_ae(peer)
        for pair in sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in batch}):
            ae.add_requested_context(pair[0], [pair[1]])
        assoc = _associate(ae, peer)
        if not assoc.is_established:
            reason = association_failure(assoc)
            rejection = association_rejection(assoc)
            stage = STAGE_CONTEXT if no_context_accepted(assoc) else STAGE_ASSOCIATE
            for f in batch:
                report(SendOutcome(f.path, STATUS_NOT_SENT, reason, stage, rejection))
            continue
        try:
            accepted = {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            for index, f in enumerate(batch):
                if not assoc.is_established:
                    for rest in batch[index:]:
                        lost = SendOutcome(
                            rest.path, STATUS_NOT_SENT, "association lost", STAGE_LOST
                        )
                        report(lost)
                    break
                if (f.sop_class_uid, f.transfer_syntax_uid) not in accepted:
                    report(
                        SendOutcome(
                            f.path,
                            STATUS_NOT_SENT,
                            "peer refused this SOP class / transfer syntax",
                            STAGE_CONTEXT,
                        )
                    )
                    continue
                try:
                    rsp = assoc.send_c_store(f.path)
                except (ValueError, AttributeError, RuntimeError) as exc:
                    detail = f"cannot send: {type(exc).__name__}"
                    report(SendOutcome(f.path, STATUS_NOT_SENT, detail, STAGE_LOCAL))
                    continue
                if rsp is None or "Status" not in rsp:
                    report(SendOutcome(f.path, STATUS_NO_RESPONSE, NO_RESPONSE, STAGE_RESPONSE))
                else:
                    status = int(rsp.Status)
                    comment = str(rsp.get("ErrorComment", "") or "")
                    report(SendOutcome(f.path, status, comment))
        finally:
            if assoc.is_established:
                assoc.release()
    return outcomes


@dataclass(frozen=True)
class FindOutcome:
    """The result of one C-FIND: its final status and the matches received before it."""

    status: int
    """Final DIMSE status, or STATUS_NO_RESPONSE / STATUS_NOT_SENT."""
    matches: list[Dataset]
    detail: str = ""
    stage: str = ""
    """Empty when the peer answered with a final status, else one of the ``STAGE_*`` values."""
    rejection: tuple[int, int, int] | None = None


def find(
    peer: Peer,
    identifier: Dataset,
    *,
    model: str = StudyRootQueryRetrieveInformationModelFind,
) -> FindOutcome:
    """C-FIND ``identifier`` at ``peer`` (Study Root by default), collecting every match.

    Never raises for network trouble: a failed association, a refused context or a missing
    final status are reported in the outcome's ``stage``, like :func:`send_files` does."""
    ae = _make_ae(peer)
    ae.add_requested_context(model)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        stage = STAGE_CONTEXT if no_context_accepted(assoc) else STAGE_ASSOCIATE
        failure = association_failure(assoc)
        return FindOutcome(STATUS_NOT_SENT, [], failure, stage, association_rejection(assoc))
    matches: list[Dataset] = []
    try:
        if not any(str(cx.abstract_syntax) == str(model) for cx in assoc.accepted_contexts):
            detail = "peer does not support this C-FIND model"
            return FindOutcome(STATUS_NOT_SENT, [], detail, STAGE_CONTEXT)
        for status, match in assoc.send_c_find(identifier, model):
            if status is None or "Status" not in status:
                return FindOutcome(STATUS_NO_RESPONSE, matches, NO_RESPONSE, STAGE_RESPONSE)
            code = int(status.Status)
            if code in (STATUS_PENDING, STATUS_PENDING_WARNING):
                if match is not None:
                    matches.append(match)
                continue
            return FindOutcome(code, matches)
        return FindOutcome(STATUS_NO_RESPONSE, matches, "no final status", STAGE_RESPONSE)
    finally:
        if assoc.is_established:
            assoc.release()


@dataclass(frozen=True)
class MoveOutcome:
    """The result of one C-MOVE: its final status and the sub-operation counts (PS3.4 C.4.2.1.6)."""

    status: int  # the final DIMSE status, or STATUS_NO_RESPONSE / STATUS_NOT_SENT
    completed: int = 0
    failed: int = 0
    warning: int = 0
    detail: str = ""
    stage: str = ""  # empty when the peer answered with a final status, else a STAGE_* value


def move(
    peer: Peer,
    identifier: Dataset,
    move_destination: str,
    *,
    model: str = StudyRootQueryRetrieveInformationModelMove,
) -> MoveOutcome:
    """C-MOVE ``identifier`` from ``peer`` to the AE title ``move_destination`` (which the peer
    must know), waiting for the final response. Never raises for network trouble (like
    :func:`find`)."""
    ae = _make_ae(peer)
    ae.add_requested_context(model)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        stage = STAGE_CONTEXT if no_context_accepted(assoc) else STAGE_ASSOCIATE
        return MoveOutcome(STATUS_NOT_SENT, detail=association_failure(assoc), stage=stage)
    try:
        if not any(str(cx.abstract_syntax) == str(model) for cx in assoc.accepted_contexts):
            detail = "peer does not support this C-MOVE model"
            return MoveOutcome(STATUS_NOT_SENT, detail=detail, stage=STAGE_CONTEXT)
        for status, _ in assoc.send_c_move(identifier, move_destination, model):
            if status is None or "Status" not in status:
                return MoveOutcome(STATUS_NO_RESPONSE, detail=NO_RESPONSE, stage=STAGE_RESPONSE)
            code = int(status.Status)
            if code in (STATUS_PENDING, STATUS_PENDING_WARNING):
                continue
            return MoveOutcome(
                code,
                completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
                warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
            )
        return MoveOutcome(STATUS_NO_RESPONSE, detail="no final status", stage=STAGE_RESPONSE)
    finally:
        if assoc.is_established:
            assoc.release()
