"""The dashboard: job list and job pages (server-rendered HTML), previews, retry and cancel.

Pages are rendered with Jinja2 from ``dicom_node/web/templates``; a small script from
``dicom_node/web/static`` refreshes them from the JSON API without reloading. Everything ships
in the package (hospital networks have no internet: no CDN). Every route here needs
credentials; a browser gets an HTTP basic challenge.
"""

from __future__ import annotations

import mimetypes
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import select

from dicom_node import audit
from dicom_node import jobs as jobstate
from dicom_node.api import job_views
from dicom_node.api.deps import (
    DatabaseDep,
    Operator,
    Principal,
    SettingsDep,
    User,
    actor_of,
    require_role,
)
from dicom_node.api.routes.studies import lookup_of
from dicom_node.api.security import cross_site
from dicom_node.state import Job, JobState
from dicom_node.study_lookup import LookupKind

router = APIRouter(tags=["dashboard"])

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"

LIST_LIMIT = 100
REFRESH_SECONDS = 5
"""How often the pages poll the JSON API for changes."""

SEARCH_KINDS = (
    (LookupKind.ACCESSION_NUMBER.value, "accession number"),
    (LookupKind.PATIENT_ID.value, "patient ID"),
    (LookupKind.STUDY_INSTANCE_UID.value, "Study Instance UID"),
)
"""The study search box's choices, the one a desk asks by most often first."""


def setup(app: FastAPI) -> None:
    from fastapi.templating import Jinja2Templates

    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    templates.env.filters["seconds"] = _seconds
    templates.env.filters["when"] = _when
    templates.env.filters["size"] = _size
    app.state.templates = templates


# -- formatting helpers (shared by the templates) ----------------------------------------------


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _when(value: str | None) -> str:
    """ISO timestamp -> 'YYYY-MM-DD HH:MM:SS' (UTC), the format the script also uses."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _size(value: Any) -> str:
    if not isinstance(value, int):
        return ""
    if value < 1024:
        return f"{value} B"
    amount = float(value)
    for unit in ("KiB", "MiB", "GiB"):
        amount /= 1024
        if amount < 1024 or unit == "GiB":
            break
    return f"{amount:.1f} {unit}"


def ohif_link(ohif_url: str | None, study_instance_uid: str | None) -> str | None:
    """``<ohif_url>/viewer?StudyInstanceUIDs=<uid>``, or None without a viewer or a UID."""
    if not ohif_url or not study_instance_uid:
        return None
    return f"{ohif_url.rstrip('/')}/viewer?StudyInstanceUIDs={quote(study_instance_uid, safe='.')}"


def _day_start(value: date | None) -> datetime | None:
    return datetime(value.year, value.month, value.day, tzinfo=UTC) if value else None


# -- pages --------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
def jobs_page(
    request: Request,
    user: User,
    db: DatabaseDep,
    state: str | None = None,
    model: str | None = None,
    date_from: Annotated[date | None, Query(alias="from")] = None,
    date_to: Annotated[date | None, Query(alias="to")] = None,
) -> Response:
    """The job list with filters (state, model, creation date in UTC)."""
    end = _day_start(date_to)
    until = end + timedelta(days=1) if end else None
    with db.session() as s:
        jobs = job_views.list_jobs(
            s,
            state=state or None,
            model=model or None,
            since=_day_start(date_from),
            until=until,
            limit=LIST_LIMIT,
        )
        models = list(s.scalars(select(Job.model).distinct().order_by(Job.model)))
        receiving = job_views.receiving_studies(s)
    return request.app.state.templates.TemplateResponse(
        request,
        "jobs.html",
        {
            "jobs": jobs,
            "states": [st.value for st in JobState],
            "models": [m for m in models if m and m != "-"],
            "filters": {
                "state": state or "",
                "model": model or "",
                "from": date_from.isoformat() if date_from else "",
                "to": date_to.isoformat() if date_to else "",
            },
            "receiving": receiving,
            "search_kinds": SEARCH_KINDS,
            "search": {"by": SEARCH_KINDS[0][0], "value": ""},
            "limit": LIST_LIMIT,
            "refresh_seconds": REFRESH_SECONDS,
            "user": user,
        },
    )


@router.get("/jobs/{job_id}", include_in_schema=False)
def job_page(
    job_id: str, request: Request, user: User, db: DatabaseDep, settings: SettingsDep
) -> Response:
    """One job: timings, findings, outputs with UIDs, deliveries, errors, preview, actions."""
    with db.session() as s:
        view = job_views.get_job(s, job_id)
    if view is None:
        raise HTTPException(404, "no such job")
    terminal = JobState(view["state"]).terminal
    sees = user.allows(job_views.IDENTIFIER_ROLE)
    return request.app.state.templates.TemplateResponse(
        request,
        "job.html",
        {
            "job": job_views.for_reader(view, sees),
            "findings": (view.get("summary") or {}).get("findings") or [],
            "ohif": ohif_link(settings.http.ohif_url, view["study"].get("study_instance_uid"))
            if sees
            else None,
            "can_retry": terminal and view["model"] != "-" and user.allows("operator"),
            "can_cancel": not terminal and user.allows("operator"),
            "refresh_seconds": REFRESH_SECONDS,
            "user": user,
        },
    )


@router.post("/studies/search", include_in_schema=False)
def study_search(
    request: Request,
    user: User,
    db: DatabaseDep,
    by: Annotated[str, Form()],
    value: Annotated[str, Form()],
) -> Response:
    """The search box's answer: the jobs of the studies with this identifier (exact match).

    A form post, not a query string: the identifier never appears in a URL. Audited like
    ``GET /api/studies``, without the identifier."""
    if cross_site(request.headers):  # BrowserProtections refuses these first; kept as a guard
        raise HTTPException(403, "cross-site request refused")
    require_role(job_views.IDENTIFIER_ROLE)(request)  # 403 (audited) for a viewer
    labels = dict(SEARCH_KINDS)
    context: dict[str, Any] = {
        "search_kinds": SEARCH_KINDS,
        "search": {"by": by, "value": value, "label": labels.get(by, "identifier")},
        "found": None,
        "error": None,
        "refresh_seconds": REFRESH_SECONDS,
        "user": user,
    }
    status = 200
    try:
        if by not in labels:
            raise HTTPException(400, "choose what to search by")
        lookup = lookup_of(
            **{kind.value: value if kind.value == by else None for kind in LookupKind}
        )
        if lookup is None:  # pragma: no cover - a form field is never missing (422 first)
            raise HTTPException(400, "nothing to search for")
        context["found"] = job_views.find_study_jobs(
            db, lookup[0], lookup[1], actor=str(user), via="dashboard", limit=LIST_LIMIT
        )
    except HTTPException as exc:
        context["error"] = exc.detail
        status = exc.status_code
    return request.app.state.templates.TemplateResponse(
        request, "studies.html", context, status_code=status
    )


# -- preview ------------------------------------------------------------------------------------


@router.get(
    "/api/jobs/{job_id}/preview.png",
    tags=["jobs"],
    summary="Key-slice preview with detections",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {}},
            "description": "The key slice of the first finding (or the middle slice) with the "
            "detections' boxes, or a placeholder image saying why there is none "
            "(header X-Preview: placeholder).",
        },
        404: {"description": "No such job."},
    },
)
def preview(
    job_id: str, request: Request, user: User, db: DatabaseDep, settings: SettingsDep
) -> Response:
    """Render (or take from the cache) the job's preview PNG, server-side. Audited (a read of
    patient images)."""
    from dicom_node.preview import job_preview

    result = job_preview(settings, db, job_id)
    if result is None:
        raise HTTPException(404, "no such job")
    audit.record(
        db,
        audit.PHI_READ,
        actor=actor_of(user, request),
        study_key=jobstate.study_key_of(db, job_id),
        job_id=job_id,
        what="preview",
    )
    headers = {"X-Preview": "placeholder" if result.placeholder else "image"}
    return Response(result.png, media_type="image/png", headers=headers)


# -- actions ------------------------------------------------------------------------------------


def _action(request: Request, user: Principal, db: Any, job_id: str, action: str) -> Response:
    if cross_site(request.headers):  # BrowserProtections refuses these first; kept as a guard
        raise HTTPException(403, "cross-site request refused")
    with db.session() as s:
        exists = s.get(Job, job_id) is not None
    if not exists:
        raise HTTPException(404, "no such job")
    done = jobstate.retry(db, job_id) if action == "retry" else jobstate.cancel(db, job_id)
    audit.record(
        db,
        audit.HTTP_ACTION,
        actor=user.name,
        outcome="success" if done else "failure",
        study_key=jobstate.study_key_of(db, job_id),
        job_id=job_id,
        action=action,
    )
    wants_html = "text/html" in request.headers.get("accept", "")
    if wants_html:  # a plain form post from the dashboard: back to the job page
        return RedirectResponse(f"/jobs/{quote(job_id)}", status_code=303)
    if not done:
        return JSONResponse(
            {
                "id": job_id,
                "action": action,
                "applied": False,
                "detail": f"cannot {action} this job in its state",
            },
            status_code=409,
        )
    return JSONResponse({"id": job_id, "action": action, "applied": True})


@router.post(
    "/api/jobs/{job_id}/retry",
    tags=["jobs"],
    responses={409: {"description": "The job is not finished, or has no model to run."}},
)
def retry(job_id: str, request: Request, user: Operator, db: DatabaseDep) -> Response:
    """Run a finished (done, failed, skipped, cancelled) job again from the start. Audited."""
    return _action(request, user, db, job_id, "retry")


@router.post(
    "/api/jobs/{job_id}/cancel",
    tags=["jobs"],
    responses={409: {"description": "The job has already finished."}},
)
def cancel(job_id: str, request: Request, user: Operator, db: DatabaseDep) -> Response:
    """Cancel a job that has not finished; a running attempt stops at its next lease
    renewal. Audited."""
    return _action(request, user, db, job_id, "cancel")


# -- static assets ------------------------------------------------------------------------------


@router.get("/static/{name}", include_in_schema=False)
def static(name: str, user: User) -> Response:
    """Files of ``dicom_node/web/static`` (flat; served behind credentials like the rest)."""
    path = (STATIC_DIR / name).resolve()
    if path.parent != STATIC_DIR.resolve() or not path.is_file():
        raise HTTPException(404, "not found")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(
        path, media_type=media_type, headers={"Cache-Control": "private, max-age=300"}
    )


@router.get("/favicon.ico", include_in_schema=False)
def favicon(user: User) -> Response:
    return Response(status_code=204)
