"""``GET /api/audit``: the audit trail (admin), and its export to a syslog collector.

When ``[audit.syslog]`` is set, :func:`setup` starts the :class:`dicom_node.atna.SyslogExporter`
of this process (``app.state.audit_exporter``), stopped at exit or by :func:`close_exporter`.
"""

from __future__ import annotations

import atexit
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request

from dicom_node import audit
from dicom_node.api.deps import Admin, DatabaseDep, actor_of

router = APIRouter(prefix="/api", tags=["audit"])


def setup(app: FastAPI) -> None:
    settings = app.state.settings
    app.state.audit_exporter = None
    if settings.audit.syslog is not None:
        from dicom_node.atna import SyslogExporter

        exporter = SyslogExporter(settings.audit.syslog, settings.node_name, app.state.db).start()
        app.state.audit_exporter = exporter
        # The records of shutdown (node-stopped) still go out; bounded, like every send.
        atexit.register(exporter.close, 2.0)


def close_exporter(app: FastAPI) -> None:
    """Stop the app's syslog exporter, sending what is queued (tests; process exit)."""
    exporter = getattr(app.state, "audit_exporter", None)
    if exporter is not None:
        exporter.close()
        app.state.audit_exporter = None


@router.get(
    "/audit",
    summary="The audit trail",
    responses={403: {"description": "Only the admin role reads the audit trail."}},
)
def read_audit(
    request: Request,
    user: Admin,
    db: DatabaseDep,
    since: Annotated[
        datetime | None,
        Query(description="records at or after this time (ISO date/time; UTC if no zone)"),
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, description="records after this id (page on without gaps)")
    ] = None,
    event: Annotated[str | None, Query(max_length=48, description="only this event")] = None,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_READ)] = 100,
) -> dict[str, Any]:
    """Audit records, oldest first: with ``since`` or ``after`` the first ``limit`` from there,
    otherwise the latest ``limit``. Each has ``id``, ``at``, ``event``, ``actor``, ``outcome``,
    ``study_key``, ``job_id`` and ``detail``. Patient-free; reading it is itself audited."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    try:
        events = audit.read_events(db, since=since, after_id=after, event=event, limit=limit)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    audit.record(
        db,
        audit.AUDIT_READ,
        actor=actor_of(user, request),
        via="api",
        records=len(events),
    )
    return {"events": events, "count": len(events)}
