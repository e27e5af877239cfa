"""HTTP access control: every route but ``/healthz`` needs a bearer token or basic credentials.

Credentials come from settings (``http.tokens``, ``http.users``). With none configured the API
is open, which the node only allows on a loopback address (see :func:`check_exposure`).

Failed logins are audited (``auth-failed``: client address, scheme, and the user name only when
it is a configured one, since a typed-in password often lands in the name field) and slowed
per client address (:class:`dicom_node.api.throttle.LoginThrottle`: 429 with ``Retry-After``).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_node import audit
from dicom_node.api.throttle import LoginThrottle
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


def _attempted_user(request: Request, settings: Settings) -> str:
    """Who a failed request claimed to be, safe for the audit trail: never a token or a
    password, and a basic user name only if it is a configured user."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return "token"
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(value.strip()).decode().partition(":")[0]
        except Exception:
            return "?"
        return user if user in settings.http.users else "?"
    return "?"


class RequireCredentials:
    """ASGI middleware: every request outside :data:`PUBLIC_PATHS` needs credentials.

    Routes also declare ``user: User``; this catches what a route cannot declare (the OpenAPI
    schema and docs pages, static files, a route that forgot), so no path is open by mistake.
    It also audits and throttles failed logins (a request without credentials is a challenge,
    not a failed login: a browser's first request never has any).
    """

    def __init__(self, app: Any, throttle: LoginThrottle) -> None:
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        address = request.client.host if request.client else "-"
        wait = self.throttle.retry_after(address)
        if wait:
            response = JSONResponse(
                {"detail": "too many failed logins from this address; retry later"},
                status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                headers={"Retry-After": str(wait)},
            )
            await response(scope, receive, send)
            return
        presented = "authorization" in request.headers
        try:
            authenticate(request)
        except HTTPException as exc:
            if presented:
                await self._failed(request, address)
            response = JSONResponse(
                {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
            )
            await response(scope, receive, send)
            return
        if presented:
            self.throttle.succeeded(address)
        await self.app(scope, receive, send)

    async def _failed(self, request: Request, address: str) -> None:
        settings: Settings = request.app.state.settings
        lockout = self.throttle.failed(address)
        user = _attempted_user(request, settings)
        scheme = request.headers.get("authorization", "").partition(" ")[0].lower()[:16]
        await run_in_threadpool(
            audit.record,
            request.app.state.db,
            audit.AUTH_FAILED,
            actor=f"http:{user}@{address}",
            outcome="failure",
            scheme=scheme or "-",
            method=request.method,
            lockout_seconds=lockout,
        )
