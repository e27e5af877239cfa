"""``GET /healthz``: liveness and readiness (the only route without credentials)."""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Database, free spool space and broker. 200 when healthy, 503 otherwise."""
    settings = request.app.state.settings
    db = request.app.state.db
    broker_check = request.app.state.broker_check
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
