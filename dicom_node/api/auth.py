"""HTTP access control: who a request comes from (:func:`authenticate`) and what they may do
(:func:`require_role`). Every route but ``/healthz`` needs credentials.

Credentials come from settings: bearer tokens (``http.tokens``), basic users (``http.users``)
and, optionally, bearer JWTs from an OpenID Connect provider (``http.oidc``,
:mod:`dicom_node.api.oidc`). Each carries a name, recorded as the actor in the audit trail, and a
role (:data:`dicom_node.settings.Role`). A plain token string or a plain ``user = password``
entry, as before roles existed, means ``admin``; an unnamed token is called ``token-N`` after
its position. With no credentials configured the API is open (every client is ``anonymous``,
``admin``), which the node only allows on a loopback address (see :func:`check_exposure`).

Roles are checked in one place, the :func:`require_role` dependency every route declares
(``user: User`` is ``viewer``). What each role grants is :data:`GRANTS`.

Failed logins are audited (``auth-failed``: client address, scheme, the reason for a rejected
JWT, and the user name only when it is a configured one, since a typed-in password often lands
in the name field) and slowed per client address (:class:`dicom_node.api.throttle.LoginThrottle`:
429 with ``Retry-After``). A request refused for its role is audited as ``access-denied``.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_node import audit
from dicom_node.api.throttle import LoginThrottle
from dicom_node.errors import ConfigError
from dicom_node.settings import HttpToken, HttpUser, Role, Settings

PUBLIC_PATHS = frozenset({"/healthz"})
"""The only paths served without credentials."""

GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"viewer"}),
    "operator": frozenset({"viewer", "operator"}),
    "admin": frozenset({"viewer", "operator", "admin", "sender", "worker"}),
    "sender": frozenset({"sender"}),
    "worker": frozenset({"worker"}),
}
"""The roles a role stands in for. ``admin`` may do everything; ``sender`` (a PACS storing over
STOW-RS) and ``worker`` (a remote worker reading over WADO-RS and putting result files) may do
only their own thing, not read the dashboard."""

RANK = ("viewer", "operator", "admin")
"""Roles of people, lowest first: with several roles in an OIDC token the highest counts."""

_CHALLENGE = {"WWW-Authenticate": 'Basic realm="dicom-node", charset="UTF-8"'}
# Basic only: Chromium ignores the whole header when a second scheme follows in it
# ('Basic realm="x", Bearer'), and the dashboard could not log in. Token clients send their
# bearer token without needing a challenge.


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a name for the audit trail and a role (None: an OIDC user
    whose token names no role this node knows, who may do nothing)."""

    name: str
    role: Role | None
    via: str
    """``token``, ``basic``, ``oidc`` or ``open`` (no credentials configured)."""

    def __str__(self) -> str:
        return self.name

    def allows(self, *roles: str) -> bool:
        """True when this principal's role stands in for any of ``roles``."""
        granted = GRANTS.get(self.role or "", frozenset())
        return any(role in granted for role in roles)


ANONYMOUS = Principal("anonymous", "admin", "open")
"""Everyone, when no credentials are configured (loopback only)."""


class AuthenticationFailed(Exception):
    """Credentials were given but are not valid; ``reason`` is safe to audit."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_exposure(settings: Settings) -> None:
    """Refuse to serve HTTP beyond loopback without credentials (Orthanc >= 1.13 does the same),
    and OpenID Connect without the library that checks its tokens."""
    if settings.http.oidc is not None:
        try:
            import jwt  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(
                "http.oidc needs PyJWT with its crypto extra: pip install 'dicom-node[oidc]'"
            ) from None
    if not settings.http_port or settings.http_auth_configured:
        return
    address = ipaddress.ip_address(settings.http_bind)
    if not address.is_loopback:
        raise ConfigError(
            f"refusing to serve the HTTP API on {settings.http_bind} without credentials: set "
            "http.tokens or http.users (DICOM_NODE_HTTP__TOKENS / DICOM_NODE_HTTP__USERS), or bind "
            "HTTP to 127.0.0.1 (DICOM_NODE_HTTP__BIND)"
        )


def _token_principal(settings: Settings, presented: str) -> Principal | None:
    value = presented.encode()
    found = None
    for number, entry in enumerate(settings.http.tokens, 1):
        if isinstance(entry, HttpToken):
            secret, name, role = entry.token, entry.name, entry.role
        else:
            secret, name, role = entry, f"token-{number}", "admin"
        # Every token is compared (no early return), so timing does not say which one matched.
        if hmac.compare_digest(secret.get_secret_value().encode(), value) and found is None:
            found = Principal(name, role, "token")
    return found


def _basic_principal(settings: Settings, value: str) -> Principal | None:
    try:
        user, _, password = base64.b64decode(value.strip()).decode().partition(":")
    except Exception:
        return None
    entry = settings.http.users.get(user)
    if entry is None:
        return None
    secret, role = (entry.password, entry.role) if isinstance(entry, HttpUser) else (entry, "admin")
    if hmac.compare_digest(secret.get_secret_value().encode(), password.encode()):
        return Principal(user, role, "basic")
    return None


def identify(request: Request) -> Principal:
    """The principal of ``request``, raising :class:`AuthenticationFailed` (credentials given
    but wrong) or ``HTTPException(401)`` (none given)."""
    settings: Settings = request.app.state.settings
    if not settings.http_auth_configured:
        return ANONYMOUS
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        principal = _token_principal(settings, value)
        if principal is not None:
            return principal
        if settings.http.oidc is not None and value.count(".") == 2:
            from dicom_node.api.oidc import verifier_of

            return verifier_of(request.app, settings.http.oidc).principal(value)
        raise AuthenticationFailed("unknown token")
    if scheme.lower() == "basic" and value:
        principal = _basic_principal(settings, value)
        if principal is not None:
            return principal
        raise AuthenticationFailed("wrong user or password")
    if header:
        raise AuthenticationFailed("unsupported scheme")
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, "authentication required", _CHALLENGE)


def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the authenticated principal, or 401.

    The principal :class:`RequireCredentials` found for this request is reused (a JWT is then
    verified once per request)."""
    state = request.scope.get("state") or {}
    principal = state.get("principal")
    if isinstance(principal, Principal):
        return principal
    try:
        return identify(request)
    except AuthenticationFailed:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "authentication required", _CHALLENGE
        ) from None


def client_address(request: Request) -> str:
    """The client's address as the audit trail records it."""
    return request.client.host if request.client else "-"


def actor_of(principal: Principal | str, request: Request) -> str:
    """``http:NAME@ADDRESS``, the actor of an HTTP request in the audit trail."""
    return f"http:{principal}@{client_address(request)}"


def require_role(*roles: Role) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the authenticated principal if its role stands in for one of
    ``roles`` (see :data:`GRANTS`), else 401 (no valid credentials) or 403 (audited).

    >>> require_role("operator").__name__
    'require_operator'
    """
    if not roles or any(r not in GRANTS for r in roles):
        raise ValueError(f"roles must be some of {sorted(GRANTS)}, got {roles!r}")

    def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if not principal.allows(*roles):
            audit.record(
                request.app.state.db,
                audit.ACCESS_DENIED,
                actor=actor_of(principal, request),
                outcome="failure",
                role=principal.role or "-",
                needs="|".join(roles),
                method=request.method,
                route=_route_template(request),
            )
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the role {' or '.join(roles)}; you are {principal.role or 'no role'}",
            )
        return principal

    dependency.__name__ = "require_" + "_or_".join(roles)
    return dependency


def _route_template(request: Request) -> str:
    """The route's path template (``/api/jobs/{job_id}/retry``): never a UID from the URL."""
    route = request.scope.get("route")
    return str(getattr(route, "path", "?"))


def _attempted_user(request: Request, settings: Settings) -> str:
    """Who a failed request claimed to be, safe for the audit trail: never a token or a
    password, and a basic user name only if it is a configured one."""
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

    Routes also declare their role (``user: User``, :func:`require_role`); this catches what a
    route cannot declare (the OpenAPI schema and docs pages, a route that forgot), so no path
    is open by mistake. It keeps the principal in the request's state for the routes, and
    audits and throttles failed logins (a request without credentials is a challenge, not a
    failed login: a browser's first request never has any).
    """

    def __init__(self, app: Any, throttle: LoginThrottle) -> None:
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        address = client_address(request)
        wait = self.throttle.retry_after(address)
        if wait:
            response = JSONResponse(
                {"detail": "too many failed logins from this address; retry later"},
                status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                headers={"Retry-After": str(wait)},
            )
            await response(scope, receive, send)
            return
        settings: Settings = request.app.state.settings
        try:
            if settings.http.oidc is not None:
                # Verifying a JWT may fetch the provider's keys: not on the event loop.
                principal = await run_in_threadpool(identify, request)
            else:
                principal = identify(request)
        except (HTTPException, AuthenticationFailed) as exc:
            if isinstance(exc, AuthenticationFailed):
                await self._failed(request, address, exc.reason)
            response = JSONResponse(
                {"detail": "authentication required"},
                status_code=status.HTTP_401_UNAUTHORIZED,
                headers=_CHALLENGE,
            )
            await response(scope, receive, send)
            return
        if principal is not ANONYMOUS:
            self.throttle.succeeded(address)
        request.state.principal = principal
        await self.app(scope, receive, send)

    async def _failed(self, request: Request, address: str, reason: str) -> None:
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
            reason=reason,
            method=request.method,
            lockout_seconds=lockout,
        )
