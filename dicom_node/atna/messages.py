"""DICOM Audit Messages (PS3.15 A.5, the XML form of IHE ATNA) in RFC 5424 syslog frames.

An audit record (:class:`dicom_node.audit.Record`) of an event :func:`kind_of` knows becomes one
``AuditMessage`` (:func:`audit_message`) and one octet-counted frame (:func:`syslog_frame`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC
from xml.sax.saxutils import quoteattr

from dicom_node import audit

PRIORITY = 10 * 8 + 5
"""RFC 5424 PRI: facility 10 (security/authorization, authpriv), severity 5 (notice)."""
MSGID = "IHE+RFC-3881"
"""The MSGID IHE ITI TF-2 3.20 gives audit messages."""
BOM = "\ufeff"

DCM = "DCM"


@dataclass(frozen=True)
class Code:
    """A coded value (PS3.15 A.5 CodedValueType)."""

    code: str
    meaning: str
    scheme: str = DCM

    def xml(self, element: str) -> str:
        return (
            f"<{element} csd-code={quoteattr(self.code)} codeSystemName={quoteattr(self.scheme)}"
            f" originalText={quoteattr(self.meaning)}/>"
        )


@dataclass(frozen=True)
class EventKind:
    """How one audit event is reported (PS3.15 A.5.3)."""

    event_id: Code
    action: str
    """EventActionCode: C, R, U, D or E."""
    event_type: Code | None = None
    study: bool = False
    """Whether the study is a participant object."""


USER_AUTHENTICATION = Code("110114", "User Authentication")
LOGIN = Code("110122", "Login")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
AUDIT_LOG_USED = Code("110101", "Audit Log Used")
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
STUDY_KEY = Code("study-key", "Study key of the node", "99DICOMNODE")
SOURCE_TYPE = Code("4", "Application Server Process or Thread")

EVENTS: dict[str, EventKind] = {
    audit.AUTH_FAILED: EventKind(USER_AUTHENTICATION, "E", LOGIN),
    audit.ACCESS_DENIED: EventKind(SECURITY_ALERT, "E", RESTRICTED_FUNCTION),
    audit.ASSOCIATION_REJECTED: EventKind(SECURITY_ALERT, "E", NODE_AUTHENTICATION),
    audit.AUDIT_READ: EventKind(AUDIT_LOG_USED, "R"),
    audit.NODE_STARTED: EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_START),
    audit.NODE_STOPPED: EventKind(APPLICATION_ACTIVITY, "E", APPLICATION_STOP),
}
"""Events sent, besides patient data reads (``phi-read``: DICOM Instances Accessed, or Query
for a QIDO-RS search)."""


def kind_of(record: audit.Record) -> EventKind | None:
    """How ``record`` is reported, or None when its event is not exported."""
    if record.event == audit.PHI_READ:
        if record.detail.get("what") == "qido-rs":
            return EventKind(QUERY, "E", study=record.study_key is not None)
        return EventKind(INSTANCES_ACCESSED, "R", study=True)
    return EVENTS.get(record.event)


def _outcome(record: audit.Record) -> str:
    """EventOutcomeIndicator: 0 success, 4 minor failure (a refused request), 8 serious."""
    return {"success": "0", "warning": "4", "failure": "4"}.get(record.outcome, "8")


def split_actor(actor: str | None) -> tuple[str, str | None]:
    """The user and network address in an actor (``http:alice@10.0.0.5`` -> alice, 10.0.0.5).

    >>> split_actor("http:alice@10.0.0.5")
    ('alice', '10.0.0.5')
    >>> split_actor("cli")
    ('cli', None)
    """
    if not actor:
        return "-", None
    _, colon, rest = actor.partition(":")
    rest = rest if colon else actor
    user, at, address = rest.rpartition("@")
    return (user, address) if at and user else (rest, None)


def audit_message(
    record: audit.Record,
    kind: EventKind,
    *,
    source_id: str,
    node_name: str,
    host: str,
    study: str | None,
) -> str:
    """The DICOM Audit Message (PS3.15 A.5.1) of ``record``. ``study`` is the participant
    object's ID (a study key or a Study Instance UID, per ``audit.syslog.participant``)."""
    at = record.at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    user, address = split_actor(record.actor)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<AuditMessage>",
        f"<EventIdentification EventActionCode={quoteattr(kind.action)}"
        f" EventDateTime={quoteattr(at)} EventOutcomeIndicator={quoteattr(_outcome(record))}>",
        kind.event_id.xml("EventID"),
        kind.event_type.xml("EventTypeCode") if kind.event_type else "",
        "</EventIdentification>",
    ]
    requestor = f'<ActiveParticipant UserID={quoteattr(user)} UserIsRequestor="true"'
    if address:
        requestor += f' NetworkAccessPointID={quoteattr(address)} NetworkAccessPointTypeCode="2"'
    parts.append(requestor + "/>")
    parts.append(
        f"<ActiveParticipant UserID={quoteattr(node_name)}"
        f' AlternativeUserID={quoteattr(str(os.getpid()))} UserIsRequestor="false"'
        f' NetworkAccessPointID={quoteattr(host)} NetworkAccessPointTypeCode="1"/>'
    )
    parts.append(f"<AuditSourceIdentification AuditSourceID={quoteattr(source_id)}>")
    parts.append(SOURCE_TYPE.xml("AuditSourceTypeCode"))
    parts.append("</AuditSourceIdentification>")
    if kind.study and study:
        id_type = STUDY_KEY if study == record.study_key else STUDY_INSTANCE_UID
        parts.append(
            f"<ParticipantObjectIdentification ParticipantObjectID={quoteattr(study)}"
            ' ParticipantObjectTypeCode="2" ParticipantObjectTypeCodeRole="3">'
        )
        parts.append(id_type.xml("ParticipantObjectIDTypeCode"))
        parts.append("</ParticipantObjectIdentification>")
    parts.append("</AuditMessage>")
    return "".join(parts)


def _printable(text: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII, no spaces, at most ``limit`` characters."""
    cleaned = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return cleaned or "-"


def syslog_frame(message: str, record: audit.Record, *, host: str, app_name: str) -> bytes:
    """One RFC 5424 message carrying ``message``, framed by octet counting (RFC 6587 3.4.1)."""
    at = record.at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    header = (
        f"<{PRIORITY}>1 {at} {_printable(host, 255)} {_printable(app_name, 48)}"
        f" {os.getpid()} {MSGID} -"
    )
    payload = f"{header} {BOM}{message}".encode()
    return f"{len(payload)} ".encode() + payload
