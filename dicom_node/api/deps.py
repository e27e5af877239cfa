"""FastAPI dependencies shared by the route modules.

Every route declares the role it needs (:func:`dicom_node.api.auth.require_role`), most through
the aliases below: ``user: User`` (any person's role: ``viewer`` and up), ``user: Operator``
(retry, cancel, backfill), ``user: Admin`` (audit trail, configuration views). A route that needs
another combination writes ``Annotated[Principal, Depends(require_role("viewer", "worker"))]``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dicom_node.api.auth import Principal, actor_of, authenticate, require_role
from dicom_node.settings import Settings
from dicom_node.state import Database

__all__ = [
    "Admin",
    "DatabaseDep",
    "Operator",
    "Principal",
    "SettingsDep",
    "User",
    "Viewer",
    "actor_of",
    "authenticate",
    "get_db",
    "get_settings",
    "require_role",
]

Viewer = Annotated[Principal, Depends(require_role("viewer"))]
"""Reads jobs, previews, the dashboard and DICOMweb (``viewer``, ``operator``, ``admin``)."""
User = Viewer
"""Add ``user: User`` to a route to require credentials of a person (every route but /healthz);
``str(user)`` is the name the audit trail records."""
Operator = Annotated[Principal, Depends(require_role("operator"))]
"""Changes what jobs do: retry, cancel, backfill (``operator``, ``admin``)."""
Admin = Annotated[Principal, Depends(require_role("admin"))]
"""Reads the audit trail and the configuration views (``admin``)."""


def get_settings(request: Request) -> Settings:
    """The node's settings, loaded once at start-up (``SettingsDep``)."""
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Database:
    """The state database of this app (``DatabaseDep``)."""
    db: Database = request.app.state.db
    return db


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
