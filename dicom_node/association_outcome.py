"""How an association request ended, read as the node's SCU needs it: connected or not, rejected
(with the A-ASSOCIATE-RJ's result, source and reason, PS3.8 9.3.4), no presentation context
accepted, or aborted."""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ


def record_rejection(event: evt.Event) -> None:
    """``EVT_PDU_RECV`` handler: keep (result, source, reason) of an A-ASSOCIATE-RJ on the
    association as the DUL thread decodes it (read by :func:`association_rejection`).

    pynetdicom 3.0's requestor waits for its socket to connect and then checks that it is
    still connected (``acse.py``, ``_negotiate_as_requestor``); when the peer rejects fast
    enough, the DUL thread has already received the rejection and closed the socket by then,
    and the association ends as an abort with the rejection unrecorded."""
    pdu = getattr(event, "pdu", None)
    if isinstance(pdu, A_ASSOCIATE_RJ):
        rejection = (int(pdu.result or 0), int(pdu.source or 0), int(pdu.reason_diagnostic or 0))
        event.assoc.wire_rejection = rejection  # type: ignore[attr-defined]


def no_context_accepted(assoc: Association) -> bool:
    """True when the peer accepted the association but none of its presentation contexts, so
    pynetdicom aborted it: the peer does not take these SOP classes / transfer syntaxes."""
    rsp = assoc.acceptor.primitive
    return (
        assoc.is_aborted
        and rsp is not None
        and rsp.result == 0x00
        and not assoc.accepted_contexts
        and bool(assoc.rejected_contexts)
    )


def association_failure(assoc: Association) -> str:
    """Why an association was not established, in one patient-free phrase (``tcp_connected`` is
    set by :func:`dicom_node.scu._associate`)."""
    if not getattr(assoc, "tcp_connected", True):
        return "could not connect (connection refused, host unreachable or timed out)"
    if no_context_accepted(assoc):
        return "the peer accepted none of the proposed SOP classes / transfer syntaxes"
    rejection = association_rejection(assoc)
    if rejection is not None:
        result, source, reason = rejection
        return f"association rejected (result {result}, source {source}, reason {reason})"
    if assoc.is_rejected:
        return "association rejected"
    if assoc.is_aborted:
        return "association aborted by the peer"
    return "could not connect or associate"


def association_rejection(assoc: Association) -> tuple[int, int, int] | None:
    """(result, source, reason/diagnostic) of an A-ASSOCIATE-RJ, or ``None`` if not rejected.

    PS3.8 9.3.4: result 1 = rejected-permanent, 2 = rejected-transient; source 1 = service
    user, 2 = service provider (ACSE), 3 = service provider (presentation). Taken from the PDU
    that :func:`record_rejection` kept when pynetdicom did not record the rejection itself."""
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None and rsp.result is not None:
        return (int(rsp.result), int(rsp.result_source or 0), int(rsp.diagnostic or 0))
    wire: tuple[int, int, int] | None = getattr(assoc, "wire_rejection", None)
    return wire
