"""uvicorn's h11 protocol with a deadline for each request's header block.

uvicorn times out idle keep-alive connections, but not a connection that has not finished
sending its headers: a client that opens a socket and sends a byte a second (slow loris) holds
it forever. Here the headers must be complete within ``header_timeout`` seconds of the
connection (or of the first byte of the next request on a kept-alive one); otherwise the node
answers 408 and closes the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


class HeaderDeadlineH11(H11Protocol):
    """:class:`H11Protocol` plus the header deadline. Use :func:`with_header_timeout`."""

    header_timeout: float = 15.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # a request's headers are complete
            self._disarm_header_deadline()
        elif self._header_deadline is None and (
            self.cycle is None or self.cycle.response_complete
        ):  # the first bytes of a new request
            self._arm_header_deadline()

    def on_response_complete(self) -> None:
        self._disarm_header_deadline()  # idle now: uvicorn's keep-alive timeout applies
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served (pipelined headers arrived meanwhile)
        self.logger.info("HTTP client too slow sending request headers: connection closed")
        self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderDeadlineH11]:
    """A protocol class for ``uvicorn.Config(http=...)`` with the given header deadline."""
    return type("HeaderDeadlineH11", (HeaderDeadlineH11,), {"header_timeout": seconds})
