"""The FastAPI application: JSON API under /api, /healthz (open), and the other HTTP routes."""

from __future__ import annotations

import shutil
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from dicom_node import __version__
from dicom_node.api import jobs as job_views
from dicom_node.api.auth import authenticate
from dicom_node.settings import Settings
from dicom_node.state import Database

User = Annotated[str, Depends(authenticate)]


def create_app(settings: Settings, db: Database, *, broker_check: Any = None) -> FastAPI:
    """Build the app. ``broker_check`` is a callable raising when the broker is unreachable."""
    app = FastAPI(
        title="dicom-node",
        version=__version__,
        description="JSON API of the dicom-node AI node. Every route except /healthz needs credentials.",
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.broker_check = broker_check

    @app.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """Liveness and readiness: database, free spool space and broker. 503 when unhealthy."""
        checks: dict[str, Any] = {}
        healthy = True
        try:
            db.ping()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
            healthy = False
        try:
            free = shutil.disk_usage(settings.spool_dir).free
            ok = free >= settings.scp.min_free_bytes
            checks["spool_free_bytes"] = free
            checks["spool"] = "ok" if ok else "below free-space floor"
            healthy &= ok
        except OSError as exc:
            checks["spool"] = f"error: {exc.strerror}"
            healthy = False
        if broker_check is not None:
            try:
                broker_check()
                checks["broker"] = "ok"
            except Exception as exc:
                checks["broker"] = f"error: {type(exc).__name__}"
                healthy = False
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "checks": checks},
            status_code=200 if healthy else 503,
        )

    @app.get("/api/jobs", tags=["jobs"])
    def list_jobs(
        user: User,
        state: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        study: Annotated[str | None, Query(description="study key")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Jobs, newest first, with state, study key, model, timings, attempts."""
        with db.session() as s:
            items = job_views.list_jobs(
                s,
                state=state,
                model=model,
                since=since,
                study_key=study,
                limit=limit,
                offset=offset,
            )
        return {"jobs": items, "count": len(items), "offset": offset}

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, user: User) -> dict[str, Any]:
        """One job with its outputs, deliveries, lease and errors."""
        with db.session() as s:
            view = job_views.get_job(s, job_id)
        if view is None:
            raise HTTPException(404, "no such job")
        return view

    @app.middleware("http")
    async def _no_store(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return app
