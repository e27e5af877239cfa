"""HTTP access control: every route but ``/healthz`` needs a bearer token or basic credentials.

Credentials come from settings (``http.tokens``, ``http.users``). With none configured the API
is open, which the node only allows on a loopback address (see :func:`check_exposure`).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse

from dicom_node.errors import ConfigError
from dicom_node.settings import Settings

PUBLIC_PATHS = frozenset({"/healthz"})
"""The only paths served without credentials."""


def check_exposure(settings: Settings) -> None:
    """Refuse to serve HTTP beyond loopback without credentials (Orthanc >= 1.13 does the same)."""
    if not settings.http_port or settings.http_auth_configured:
        return
    address = ipaddress.ip_address(settings.http_bind)
    if not address.is_loopback:
        raise ConfigError(
            f"refusing to serve the HTTP API on {settings.http_bind} without credentials: set "
            "http.tokens or http.users (DICOM_NODE_HTTP__TOKENS / DICOM_NODE_HTTP__USERS), or bind "
            "HTTP to 127.0.0.1 (DICOM_NODE_HTTP__BIND)"
        )


def authenticate(request: Request) -> str:
    """FastAPI dependency: the authenticated user name, or 401."""
    settings: Settings = request.app.state.settings
    if not settings.http_auth_configured:
        return "anonymous"
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        for token in settings.http.tokens:
            if hmac.compare_digest(token.get_secret_value().encode(), value.strip().encode()):
                return "token"
    elif scheme.lower() == "basic" and value:
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except Exception:
            user, password = "", ""
        expected = settings.http.users.get(user)
        if expected is not None and hmac.compare_digest(
            expected.get_secret_value().encode(), password.encode()
        ):
            return user
    raise HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="authentication required",
        # Basic only: Chromium ignores the whole header when a second scheme follows in it
        # ('Basic realm="x", Bearer'), and the dashboard could not log in. Token clients send
        # their bearer token without needing a challenge.
        headers={"WWW-Authenticate": 'Basic realm="dicom-node", charset="UTF-8"'},
    )


class RequireCredentials:
    """ASGI middleware: every request outside :data:`PUBLIC_PATHS` needs credentials.

    Routes also declare ``user: User``; this catches what a route cannot declare (the OpenAPI
    schema and docs pages, static files, a route that forgot), so no path is open by mistake.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            try:
                authenticate(Request(scope))
            except HTTPException as exc:
                response = JSONResponse(
                    {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
