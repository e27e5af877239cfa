"""pynetdicom event handlers of the storage SCP. Dependencies arrive as extra handler args."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pynetdicom import evt
from pynetdicom.events import Event

from dicom_node import audit
from dicom_node.ingest import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS

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
    request = event.request
    calling = event.assoc.requestor.ae_title.strip()
    try:
        if receiver.chunked:
            temp = Path(event.dataset_path)
        else:
            temp = receiver.spool.new_temp_path()
            with temp.open("wb") as fh:
                fh.write(event.encoded_dataset(include_meta=True))
    except OSError as exc:
        LOGGER.error("cannot write received instance: %s", exc.strerror)
        receiver.observe_status(STATUS_OUT_OF_RESOURCES, 0)
        return STATUS_OUT_OF_RESOURCES
    size = temp.stat().st_size if temp.exists() else 0
    result = receiver.ingestor.ingest_file(
        temp,
        calling_ae_title=calling,
        source="dimse",
        expected_sop_class_uid=str(request.AffectedSOPClassUID),
        expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
    )
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
    calling = event.assoc.requestor.primitive.calling_ae_title.strip()
    host = event.assoc.requestor.address
    if any(c.ae_title == calling and c.allows_host(host) for c in allowed):
        return
    LOGGER.warning("association from %s rejected: calling AE title not allowed", audit.clean(host))
    event.assoc.acse.send_reject(*REJECT_CALLING_AE)
    receiver.observe_association("rejected")
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


def bindings(receiver: Receiver) -> list[tuple]:  # type: ignore[type-arg]
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
