"""pynetdicom event handlers of the storage SCP. Dependencies arrive as extra handler args."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node import audit
from dicom_node.dimse_status import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS
from dicom_node.scp.incoming import IncomingDataset

if TYPE_CHECKING:
    from dicom_node.scp.server import Receiver

LOGGER = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 Table 9-21
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, ACSE user, calling-AE-not-recognized


def _peer(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{audit.clean(requestor.ae_title, 16)}@{requestor.address}"


def handle_echo(event: Event) -> int:
    """C-ECHO: always success once the association is up."""
    return STATUS_SUCCESS


def handle_store(event: Event, receiver: Receiver) -> int:
    """C-STORE: validate and store durably, then answer. Success only once on disk + indexed."""
    request = cast(C_STORE, event.request)
    calling = event.assoc.requestor.ae_title.strip()
    expected = {
        "expected_sop_class_uid": str(request.AffectedSOPClassUID or ""),
        "expected_sop_instance_uid": str(request.AffectedSOPInstanceUID or ""),
    }
    sink = getattr(request, "_dataset_file", None)
    if isinstance(sink, IncomingDataset):
        if sink.error is not None or sink.oversize or sink.no_space:
            if sink.no_space:
                why = sink.no_space
            elif sink.oversize:
                why = f"instance larger than the size cap of {sink.max_bytes} bytes"
            else:
                why = f"cannot write received instance: {sink.error.strerror if sink.error else ''}"
            LOGGER.error("instance refused (status 0x%04X): %s", STATUS_OUT_OF_RESOURCES, why)
            sink.discard()
            receiver.observe_status(STATUS_OUT_OF_RESOURCES, 0)
            return STATUS_OUT_OF_RESOURCES
        size = sink.size
        if sink.in_memory:
            data, sink.buffer = sink.buffer, bytearray()
            result = receiver.ingestor.ingest_bytes(data, calling_ae_title=calling, **expected)
        else:
            sink.close()
            if sink.error is not None:
                sink.discard()
                receiver.observe_status(STATUS_OUT_OF_RESOURCES, 0)
                return STATUS_OUT_OF_RESOURCES
            result = receiver.ingestor.ingest_file(sink.path, calling_ae_title=calling, **expected)
    else:
        # pynetdicom's own temporary file (no sink hook in this pynetdicom version)
        try:
            temp = Path(event.dataset_path)
            size = temp.stat().st_size
        except (OSError, AttributeError) as exc:
            LOGGER.error("cannot read received instance: %s", type(exc).__name__)
            receiver.observe_status(STATUS_OUT_OF_RESOURCES, 0)
            return STATUS_OUT_OF_RESOURCES
        result = receiver.ingestor.ingest_file(temp, calling_ae_title=calling, **expected)
    receiver.observe_status(result.status, size if result.ok else 0)
    if result.new_study:
        audit.record(
            receiver.db, audit.STUDY_RECEIVED, actor=_peer(event), study_key=result.study_key
        )
    return result.status


def handle_requested(event: Event, receiver: Receiver) -> None:
    """A-ASSOCIATE-RQ: enforce the calling AE allow-list (optionally bound to hosts)."""
    allowed = receiver.settings.scp.allowed_callers
    if allowed is None:
        return
    primitive = event.assoc.requestor.primitive
    if primitive is None:
        return
    calling = primitive.calling_ae_title.strip()
    host = event.assoc.requestor.address
    if any(c.ae_title == calling and c.allows_host(host) for c in allowed):
        return
    LOGGER.warning("association from %s rejected: calling AE title not allowed", audit.clean(host))
    event.assoc.acse.send_reject(*REJECT_CALLING_AE)
    # send_reject only queues the A-ASSOCIATE-RJ; pynetdicom closes the socket as soon as this
    # handler returns, which raced the DUL thread and the peer saw an abort instead of the
    # rejection. Wait, as pynetdicom's own rejections do, until the DUL has sent it.
    receiver.observe_association("rejected")
    event.assoc.kill()
    audit.record(
        receiver.db,
        audit.ASSOCIATION_REJECTED,
        actor=f"{audit.clean(calling, 16)}@{host}",
        outcome="failure",
        reason="calling AE title not allowed from this host",
    )


def handle_rejected(event: Event, receiver: Receiver) -> None:
    """Rejections decided by pynetdicom itself (called AE title, association limit)."""
    receiver.observe_association("rejected")
    audit.record(
        receiver.db,
        audit.ASSOCIATION_REJECTED,
        actor=_peer(event),
        outcome="failure",
        reason="called AE title or association limit",
    )


def handle_accepted(event: Event, receiver: Receiver) -> None:
    receiver.observe_association("accepted")
    audit.record(receiver.db, audit.ASSOCIATION_ACCEPTED, actor=_peer(event))


def handle_closed(event: Event, receiver: Receiver) -> None:
    receiver.observe_association("closed")


def bindings(receiver: Receiver) -> list[tuple[Any, ...]]:
    """The (event, handler, args) list for ``start_server``."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [receiver]),
        (evt.EVT_REQUESTED, handle_requested, [receiver]),
        (evt.EVT_REJECTED, handle_rejected, [receiver]),
        (evt.EVT_ACCEPTED, handle_accepted, [receiver]),
        (evt.EVT_RELEASED, handle_closed, [receiver]),
        (evt.EVT_ABORTED, handle_closed, [receiver]),
    ]
