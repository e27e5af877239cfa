"""Browser-facing protections: response security headers and the cross-site request check.

* Every response is ``Cache-Control: no-store`` unless it says otherwise (static files),
  says ``X-Content-Type-Options: nosniff`` and may not be framed
  (``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'``, against click-jacking of the
  retry/cancel buttons); pages load scripts, styles and images from the node only.
* A state-changing request (any method but GET/HEAD/OPTIONS) that a browser marks as coming
  from another site is refused with 403: the browser would attach cached basic credentials to
  it (cross-site request forgery). ``Origin: null`` (sandboxed frames, ``data:`` pages,
  some redirects) counts as another site. Clients that are not browsers send no ``Origin`` and
  no ``Sec-Fetch-Site`` and are not affected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-eval'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""The policy of every response that does not set its own (the API docs page does). Inline
scripts and scripts from elsewhere never run. ``'unsafe-eval'`` is there for browser
automation only (Playwright's ``waitForFunction``, used by the dashboard tests, evaluates
strings in the page); the dashboard's own script never evaluates strings."""

SECURITY_HEADERS = (
    (b"cache-control", b"no-store"),  # job pages and JSON are live, and may name studies
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def cross_site(headers: Mapping[str, str]) -> bool:
    """True when a browser says the request comes from another origin (RFC 6454; Fetch
    Metadata ``Sec-Fetch-Site``). ``Origin: null`` is another origin."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None:  # set by the browser itself, right behind a proxy too
        return fetch_site not in ("same-origin", "none")
    origin = headers.get("origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    parts = urlsplit(origin)
    return not parts.netloc or parts.netloc.lower() != headers.get("host", "").lower()


class BrowserProtections:
    """ASGI middleware: the security headers on every response, and the cross-site refusal.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one runs the app in a task group
    and would wrap the body-limit exceptions of :mod:`dicom_node.api.limits` in a group."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if scope["method"] not in SAFE_METHODS and cross_site(Headers(scope=scope)):
            response = JSONResponse({"detail": "cross-site request refused"}, status_code=403)
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)
