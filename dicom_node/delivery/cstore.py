"""C-STORE write-back: the stored files over one association per batch (:func:`dicom_node.scu.send_files`),
every status checked, an empty status counted as a failure."""

from __future__ import annotations

import socket
import ssl

from dicom_node.delivery.destinations import CStoreDestination
from dicom_node.delivery.objects import StoredObject
from dicom_node.delivery.report import InstanceOutcome
from dicom_node.dimse_status import Verdict, classify_status, describe
from dicom_node.scu import (
    STAGE_ASSOCIATE,
    STAGE_CONTEXT,
    STAGE_LOCAL,
    DicomFile,
    SendOutcome,
    echo,
    send_files,
)

# A-ASSOCIATE-RJ (source, reason) pairs that no amount of waiting fixes (PS3.8 9.3.4):
# application context name not supported, called AE title not recognised (we call the wrong
# AE title), protocol version not supported. Everything else -- including DCMTK's --refuse,
# which answers "rejected-permanent, no reason given" -- is retried: PACS reject while busy, in
# maintenance, or until an administrator has registered our AE title.
PERMANENT_REJECTIONS = {(1, 2), (1, 7), (2, 2)}


def rejection_text(rejection: tuple[int, int, int]) -> str:
    result, source, reason = rejection
    results = {1: "rejected-permanent", 2: "rejected-transient"}
    reasons = {
        (1, 1): "no reason given",
        (1, 2): "application context name not supported",
        (1, 3): "calling AE title not recognised",
        (1, 7): "called AE title not recognised",
        (2, 1): "no reason given (ACSE)",
        (2, 2): "protocol version not supported",
        (3, 1): "temporary congestion",
        (3, 2): "local limit exceeded",
    }
    return (
        f"association {results.get(result, f'rejected ({result})')}: "
        f"{reasons.get((source, reason), f'source {source}, reason {reason}')}"
    )


def classify_send(outcome: SendOutcome) -> tuple[Verdict, str]:
    """The verdict and a patient-free description of one :class:`SendOutcome`."""
    if not outcome.stage:
        verdict = classify_status(outcome.status)
        return verdict, describe(outcome.status)
    if outcome.stage == STAGE_ASSOCIATE:
        if outcome.rejection is not None:
            _, source, reason = outcome.rejection
            permanent = (source, reason) in PERMANENT_REJECTIONS
            return (Verdict.PERMANENT if permanent else Verdict.TRANSIENT), rejection_text(
                outcome.rejection
            )
        return Verdict.TRANSIENT, outcome.detail  # refused connection, abort, ACSE timeout
    if outcome.stage == STAGE_CONTEXT:
        return Verdict.PERMANENT, "the peer does not accept this SOP class / transfer syntax"
    if outcome.stage == STAGE_LOCAL:
        return Verdict.PERMANENT, outcome.detail
    return Verdict.TRANSIENT, outcome.detail  # lost association, no response (timeout / abort)


def tls_problem(dest: CStoreDestination) -> str | None:
    """Why a TLS handshake with the peer fails for a reason no retry fixes (an untrusted or
    mismatched certificate, no common protocol), or ``None``.

    pynetdicom reports a failed handshake like a refused connection; this repeats the handshake
    alone, only after an association failed, so that a certificate problem fails the delivery
    at once instead of being retried for hours."""
    peer = dest.peer()
    if peer.tls is None:
        return None
    try:
        hostname = peer.server_hostname or dest.host
        with (
            socket.create_connection((dest.host, dest.port), timeout=dest.timeout) as raw,
            peer.tls.wrap_socket(raw, server_hostname=hostname),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the peer's certificate is not trusted ({exc.verify_message})"
    except ssl.SSLError as exc:
        if "alert" in str(exc).lower() and "certificate" in str(exc).lower():
            return "TLS: the peer refused our certificate"
        return None  # handshake trouble of another kind: treat as transient
    except OSError:
        return None  # not reachable: that is the transient failure already reported


def store(dest: CStoreDestination, objects: list[StoredObject]) -> list[InstanceOutcome]:
    """C-STORE the objects; one outcome per object (DUPLICATE ones still need an ownership check)."""
    by_path = {obj.path: obj for obj in objects}
    files = [
        DicomFile(obj.path, obj.sop_class_uid, obj.sop_instance_uid, obj.transfer_syntax_uid)
        for obj in objects
    ]
    sent = send_files(dest.peer(), files)
    tls = None
    if dest.tls is not None and any(
        o.stage == STAGE_ASSOCIATE and o.rejection is None for o in sent
    ):
        tls = tls_problem(dest)
    outcomes = []
    for one in sent:
        verdict, detail = classify_send(one)
        if tls is not None and one.stage == STAGE_ASSOCIATE and one.rejection is None:
            verdict, detail = Verdict.PERMANENT, tls
        status = one.status if not one.stage else None
        outcomes.append(
            InstanceOutcome(one.path, by_path[one.path].sop_instance_uid, verdict, status, detail)
        )
    return outcomes


def ping(dest: CStoreDestination) -> int:
    """C-ECHO; returns the status (0 on success) or raises ``ConnectionError``."""
    return echo(dest.peer())
