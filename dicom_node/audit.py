"""The audit trail: one append-only, patient-free record per event.

Each record says who (calling AE title and host, HTTP user, worker id or ``node``), what (the
event name), when, and the outcome, plus opaque keys (study key, job id). It is written to the
state database (table ``audit_events``) and, as one line, to the ``dicom_node.audit`` logger.
Values are single-line: control characters are replaced, so a hostile AE title cannot forge or
split records; an exception passed as a value is recorded by its type (``dicom_node.phi``).

The trail is read back with :func:`read_events` (``GET /api/audit``, ``dicom-node audit``), and
records can be handed on as they are made to an exporter (:func:`subscribe`; the syslog / IHE
ATNA export of :mod:`dicom_node.atna` is one).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

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
ACCESS_DENIED = "access-denied"
"""An authenticated client asked for something its role does not allow (403)."""
PHI_READ = "phi-read"
"""Patient data read over HTTP: ``what`` is ``wado-rs``, ``wado-rs-metadata``, ``qido-rs`` or
``preview`` (study key and counts only; never a UID or a patient identifier)."""
AUDIT_READ = "audit-read"
"""The audit trail itself was read (``GET /api/audit``, ``dicom-node audit``)."""
RETENTION_SWEEP = "retention-sweep"
"""A retention sweep removed files or met disk pressure (:mod:`dicom_node.retention`): counts
and bytes only, never a study."""
STUDY_RERUN = "study-rerun"
"""A completed study routed again with no new instance, for a model version or a rule its jobs
did not run (:func:`dicom_node.completion.rerun_study`): the reason and the number of jobs."""
BACKFILL_RUN = "backfill-run"
"""One backfill (``dicom-node backfill`` or a ``[[pull]]`` schedule, :mod:`dicom_node.backfill`):
the source (no credentials), the date window and counts only, never a study."""


@dataclass(frozen=True)
class Record:
    """One audit record as it is stored, handed to exporters (:func:`subscribe`)."""

    at: datetime
    event: str
    actor: str | None
    outcome: str
    study_key: str | None
    job_id: str | None
    detail: dict[str, Any] = field(default_factory=dict)


_exporters: list[Callable[[Record], None]] = []
_exporters_lock = threading.Lock()


def subscribe(exporter: Callable[[Record], None]) -> Callable[[], None]:
    """Call ``exporter`` with every record made in this process from now on; returns the
    function that stops it. An exporter must be quick and never block (queue the record and
    send it from another thread); what it raises is logged and dropped."""
    with _exporters_lock:
        _exporters.append(exporter)

    def unsubscribe() -> None:
        with _exporters_lock:
            if exporter in _exporters:
                _exporters.remove(exporter)

    return unsubscribe


def _export(entry: Record) -> None:
    with _exporters_lock:
        exporters = list(_exporters)
    for exporter in exporters:
        try:
            exporter(entry)
        except Exception as exc:  # an exporter must not fail the action it records
            LOGGER.error("audit exporter failed on %s: %s", entry.event, type(exc).__name__)


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
    at = utcnow()
    if _exporters:
        _export(Record(at, event, safe_actor, outcome, study_key, job_id, dict(safe_detail)))
    if db is None:
        return
    try:
        with db.session() as s:
            s.add(
                AuditEvent(
                    at=at,
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


MAX_READ = 10_000
"""Most records one read returns."""


def read_events(
    db: Database,
    *,
    since: datetime | None = None,
    after_id: int | None = None,
    event: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Audit records, oldest first, as JSON-ready dicts (``id``, ``at``, ``event``, ``actor``,
    ``outcome``, ``study_key``, ``job_id``, ``detail``).

    With ``since`` or ``after_id`` (an ``id`` already seen: how a shipper pages on without
    gaps), the first ``limit`` records from there; without either, the latest ``limit``."""
    if not 1 <= limit <= MAX_READ:
        raise ValueError(f"limit must be 1..{MAX_READ}, got {limit}")
    query = select(AuditEvent)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if after_id is not None:
        query = query.where(AuditEvent.id > after_id)
    if event is not None:
        query = query.where(AuditEvent.event == event)
    forward = since is not None or after_id is not None
    query = query.order_by(AuditEvent.id if forward else AuditEvent.id.desc()).limit(limit)
    with db.session() as s:
        rows = list(s.scalars(query))
        out = [
            {
                "id": r.id,
                "at": r.at.isoformat() if r.at else None,
                "event": r.event,
                "actor": r.actor,
                "outcome": r.outcome,
                "study_key": r.study_key,
                "job_id": r.job_id,
                "detail": dict(r.detail or {}),
            }
            for r in rows
        ]
    return out if forward else out[::-1]
