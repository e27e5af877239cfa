"""The FastAPI application. Route modules live in :mod:`dicom_node.api.routes`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fastapi import FastAPI

from dicom_node import __version__
from dicom_node.api import routes
from dicom_node.api.auth import RequireCredentials
from dicom_node.api.limits import LimitBody
from dicom_node.api.security import BrowserProtections
from dicom_node.api.throttle import LoginThrottle
from dicom_node.settings import Settings
from dicom_node.state import Database


def create_app(settings: Settings, db: Database, *, broker_check: Any = None) -> FastAPI:
    """Build the app. ``broker_check`` is a callable raising when the broker is unreachable."""
    app = FastAPI(
        title="dicom-node",
        version=__version__,
        description="HTTP API of the dicom-node AI node. Every route except /healthz needs credentials.",
        docs_url=None,  # served from the node itself by routes/docs.py (no CDN)
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.broker_check = broker_check

    for info in sorted(pkgutil.iter_modules(routes.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{routes.__name__}.{info.name}")
        setup = getattr(module, "setup", None)
        if callable(setup):
            setup(app)
        router = getattr(module, "router", None)
        if router is not None:
            app.include_router(router)

    # add_middleware puts each one outside the previous: a request meets BrowserProtections
    # first, then LimitBody, then RequireCredentials, so every answer (401, 413, 429 too)
    # carries the security headers, and an unauthenticated client never gets to stream a body.
    http = settings.http
    app.add_middleware(
        RequireCredentials,
        throttle=LoginThrottle(http.login_failures, http.login_lockout_max),
    )
    app.add_middleware(
        LimitBody,
        max_header_bytes=http.max_header_bytes,
        max_stow_bytes=http.max_stow_bytes,
        body_timeout=http.body_timeout,
    )
    app.add_middleware(BrowserProtections)
    return app
