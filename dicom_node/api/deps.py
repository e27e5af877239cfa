"""FastAPI dependencies shared by the route modules."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dicom_node.api.auth import authenticate
from dicom_node.settings import Settings
from dicom_node.state import Database

User = Annotated[str, Depends(authenticate)]
"""Add ``user: User`` to a route to require credentials (every route but /healthz)."""


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
