"""Request limits: header size, a body size cap per route, an idle timeout between body chunks.

Headers larger than ``http.max_header_bytes`` are answered 431 (h11 already refuses a header
block that grows past it while incomplete; this also catches one that arrives whole).

STOW-RS bodies (``POST /dicom-web/studies...``) and result files a remote worker puts in the
result store (``PUT /api/jobs/<id>/results/<name>``) may be as large as ``http.max_stow_bytes``;
every other route takes at most :data:`SMALL_BODY_BYTES` (none of them reads a body). A declared
``Content-Length`` over the cap is refused before any of the body is read; a chunked body is
counted as it streams and refused the moment it passes the cap. Either way the answer is 413
and the connection is closed, so the rest of the body is never read.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.responses import JSONResponse

SMALL_BODY_BYTES = 1024 * 1024
"""Body limit of the routes that are not STOW-RS."""

STOW_PREFIX = "/dicom-web/studies"
_RESULT_PUT = re.compile(r"^/api/jobs/[^/]+/results/[^/]+$")


class BodyTooLarge(Exception):
    """The request body passed its limit (raised from ``receive``)."""


class BodyTimeout(Exception):
    """The client stopped sending the request body (raised from ``receive``)."""


def body_limit(method: str, path: str, max_stow_bytes: int) -> int:
    """The body limit (bytes) of one request."""
    if method == "POST" and (path == STOW_PREFIX or path.startswith(STOW_PREFIX + "/")):
        return max_stow_bytes
    if method == "PUT" and _RESULT_PUT.match(path):
        return max_stow_bytes
    return SMALL_BODY_BYTES


async def _refuse(send: Any, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Any:  # pragma: no cover - a plain response never receives
    return {"type": "http.disconnect"}


class LimitBody:
    """ASGI middleware enforcing the header and body limits and ``body_timeout``.

    Routes that stream the body (STOW-RS) catch :class:`BodyTooLarge` / :class:`BodyTimeout`
    to clean up and re-raise; this middleware then answers 413 / 408 if no response started.
    """

    def __init__(
        self, app: Any, *, max_header_bytes: int, max_stow_bytes: int, body_timeout: float
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_stow_bytes = max_stow_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = len(scope.get("raw_path", b"")) + len(scope["query_string"])
        header_bytes += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            await _refuse(send, 431, "request headers too large")
            return
        limit = body_limit(scope["method"], scope["path"], self.max_stow_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(send, 413, f"request body larger than {limit} bytes")
            return

        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Any:
            nonlocal received, body_done
            if body_done:  # afterwards only http.disconnect comes: wait for it as long as needed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise BodyTimeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
                body_done = not message.get("more_body", False)
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if started:
                raise
            await _refuse(send, 413, f"request body larger than {limit} bytes")
        except BodyTimeout:
            if started:
                raise
            await _refuse(send, 408, "timed out waiting for the request body")


def _content_length(scope: Any) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before we get here
    return None
