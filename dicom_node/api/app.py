"""The FastAPI application. Route modules live in :mod:`dicom_node.api.routes`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fastapi import FastAPI, Request

from dicom_node import __version__
from dicom_node.api import routes
from dicom_node.api.auth import RequireCredentials
from dicom_node.settings import Settings
from dicom_node.state import Database


def create_app(settings: Settings, db: Database, *, broker_check: Any = None) -> FastAPI:
    """Build the app. ``broker_check`` is a callable raising when the broker is unreachable."""
    app = FastAPI(
        title="dicom-node",
        version=__version__,
        description="HTTP API of the dicom-node AI node. Every route except /healthz needs credentials.",
        docs_url="/api/docs",
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

    @app.middleware("http")
    async def _no_store(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.add_middleware(RequireCredentials)
    return app
