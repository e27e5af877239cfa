"""The audit trail: one append-only, patient-free record per event.

Each record says who (calling AE title and host, HTTP user, worker id or ``node``), what (the
event name), when, and the outcome, plus opaque keys (study key, job id). It is written to the
state database (table ``audit_events``) and, as one line, to the ``dicom_node.audit`` logger.
Values are single-line: control characters are replaced, so a hostile AE title cannot forge or
split records; an exception passed as a value is recorded by its type (``dicom_node.phi``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from dicom_node.phi import describe_exception
from dicom_node.state import AuditEvent, Database, utcnow

LOGGER = logging.getLogger("dicom_node.audit")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Event names (stable; dashboards and log searches rely on them).
CONFIG_LOADED = "config-loaded"
NODE_STARTED = "node-started"
NODE_STOPPED = "node-stopped"
ASSOCIATION_ACCEPTED = "association-accepted"
ASSOCIATION_REJECTED = "association-rejected"
STUDY_RECEIVED = "study-received"
STUDY_COMPLETED = "study-completed"
JOB_STATE = "job-state"
RESULT_DELIVERED = "result-delivered"
DELIVERY_FAILED = "delivery-failed"
HTTP_ACTION = "http-action"
AUTH_FAILED = "auth-failed"


def clean(value: object, limit: int = 128) -> str:
    """A value made safe for a one-line record (an exception is named by its type only, unless
    it is one of the node's own: a library's message may quote a dataset value)."""
    text = describe_exception(value) if isinstance(value, BaseException) else str(value)
    return _CONTROL.sub("?", text)[:limit]


def record(
    db: Database | None,
    event: str,
    *,
    actor: str | None = None,
    outcome: str = "success",
    study_key: str | None = None,
    job_id: str | None = None,
    **detail: Any,
) -> None:
    """Append one audit record. Never raises: an audit failure is logged, not propagated."""
    safe_actor = clean(actor) if actor is not None else None
    safe_detail = {
        k: (clean(v, 512) if isinstance(v, str | BaseException) else v) for k, v in detail.items()
    }
    LOGGER.info(
        "audit %s outcome=%s actor=%s study=%s job=%s %s",
        event,
        outcome,
        safe_actor or "-",
        study_key or "-",
        job_id or "-",
        " ".join(f"{k}={v}" for k, v in safe_detail.items()),
        extra={"study_key": study_key, "job_id": job_id, "audit_event": event},
    )
    if db is None:
        return
    try:
        with db.session() as s:
            s.add(
                AuditEvent(
                    at=utcnow(),
                    event=event,
                    actor=safe_actor,
                    outcome=outcome,
                    study_key=study_key,
                    job_id=job_id,
                    detail=safe_detail,
                )
            )
    except Exception as exc:  # the audit must not take the node down
        LOGGER.error("audit record %s could not be stored: %s", event, type(exc).__name__)


def job_state(
    db: Database | None,
    job_id: str,
    study_key: str | None,
    state: str,
    *,
    actor: str,
    outcome: str = "success",
    **detail: Any,
) -> None:
    """Record a job's move to ``state`` (a :class:`~dicom_node.state.JobState` value)."""
    record(
        db,
        JOB_STATE,
        actor=actor,
        outcome=outcome,
        study_key=study_key,
        job_id=job_id,
        state=state,
        **detail,
    )
