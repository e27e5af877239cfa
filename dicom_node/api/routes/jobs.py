"""``/api/jobs``: job list and detail (JSON)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from dicom_node.api import job_views
from dicom_node.api.deps import DatabaseDep, User

router = APIRouter(prefix="/api", tags=["jobs"])


@router.get("/jobs")
def list_jobs(
    user: User,
    db: DatabaseDep,
    state: str | None = None,
    model: str | None = None,
    since: Annotated[
        datetime | None, Query(description="created at or after (ISO date/time; UTC if no zone)")
    ] = None,
    until: Annotated[datetime | None, Query(description="created before (ISO date/time)")] = None,
    study: Annotated[str | None, Query(description="study key")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    """Jobs, newest first, with state, study key, model, timings, attempts, findings count
    and delivery states."""
    with db.session() as s:
        items = job_views.list_jobs(
            s,
            state=state,
            model=model,
            since=since,
            until=until,
            study_key=study,
            limit=limit,
            offset=offset,
        )
    sees = user.allows(job_views.IDENTIFIER_ROLE)
    items = [job_views.for_reader(item, sees) for item in items]
    return {"jobs": items, "count": len(items), "offset": offset}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, user: User, db: DatabaseDep) -> dict[str, Any]:
    """One job with its outputs, deliveries, lease and errors."""
    with db.session() as s:
        view = job_views.get_job(s, job_id)
    if view is None:
        raise HTTPException(404, "no such job")
    return job_views.for_reader(view, user.allows(job_views.IDENTIFIER_ROLE))
