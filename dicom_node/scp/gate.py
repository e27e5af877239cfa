"""Connection caps applied on accept, before a thread or an association exists.

pynetdicom's server starts a thread per TCP connection and only counts associations once an
A-ASSOCIATE-RQ has been read (``maximum_associations``), so a flood of connections that never
associate piled up threads without limit. :class:`ConnectionGate` admits a connection only
while this receiver process holds fewer than ``max_total`` open connections, and fewer than
``max_per_host`` from that peer address; :class:`Refuser` turns the others away with an
A-ASSOCIATE-RJ (rejected-transient, local-limit-exceeded, PS3.8 Table 9-21) from one shared
thread, without reading them.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from dicom_node.scp import wire

LOGGER = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
ANSWER_WITHIN_SECONDS = 0.5
"""A refused peer's rejection goes out when its first bytes arrive, or after this long."""
"""How long a refused connection is kept open for the peer to read the rejection."""
MAX_LINGERING = 256
"""Refused connections kept open at once; beyond that they are closed at once."""
LOG_EVERY = 100
"""A flood logs its first refusal and then every this many, per peer address."""


@dataclass(eq=False)
class Ticket:
    """One admitted connection; :meth:`release` gives its place back (once)."""

    gate: ConnectionGate
    host: str
    owner: object | None = None
    """What holds the connection now (the association), once the accept path handed it over."""
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        self.gate._release(self)


class ConnectionGate:
    """Open-connection counts of one receiver process, in all and per peer address."""

    def __init__(self, max_total: int, max_per_host: int) -> None:
        self.max_total = max_total
        self.max_per_host = max_per_host
        self._lock = threading.Lock()
        self._per_host: Counter[str] = Counter()
        self._total = 0

    @property
    def open(self) -> int:
        return self._total

    def admit(self, host: str) -> Ticket | str:
        """A :class:`Ticket` when ``host`` may open one more connection, else why not."""
        with self._lock:
            if self._total >= self.max_total:
                return f"{self._total} connections open (scp.max_connections)"
            if self._per_host[host] >= self.max_per_host:
                return (
                    f"{self._per_host[host]} connections open from this address "
                    "(scp.max_connections_per_host)"
                )
            self._total += 1
            self._per_host[host] += 1
            return Ticket(self, host)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            self._total -= 1
            self._per_host[ticket.host] -= 1
            if self._per_host[ticket.host] <= 0:
                del self._per_host[ticket.host]


class Refuser:
    """Rejects connections over a cap with A-ASSOCIATE-RJ, without a thread per connection.

    One thread watches the refused sockets for up to :data:`LINGER_SECONDS`. The rejection goes
    out when the peer's first bytes (its A-ASSOCIATE-RQ) arrive, which are discarded unparsed, as
    is whatever follows, or after :data:`ANSWER_WITHIN_SECONDS` from a peer that sends nothing:
    a rejection sent at accept can reach a requestor still between connecting and sending its
    request, where an unexpected PDU may be taken for a protocol error and the peer sees an abort
    instead of "local limit exceeded". The socket then stays open until the peer closes it or the
    time is up, so that closing it does not reset the connection before the peer has read the
    rejection. TLS connections are closed without a word (no handshake is spent on them).
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._awaiting: dict[socket.socket, float] = {}
        """Refused sockets not answered yet, with the time the rejection goes out regardless."""
        self._counts: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def refuse(self, sock: socket.socket, host: str, why: str) -> None:
        if len(self._counts) > 10_000:  # a flood from many addresses: keep the log counts small
            self._counts.clear()
        self._counts[host] += 1
        if self._counts[host] % LOG_EVERY == 1:
            LOGGER.warning(
                "connection from %s refused before association: %s (%d so far)",
                host,
                why,
                self._counts[host],
            )
        if isinstance(sock, ssl.SSLSocket):
            _close(sock)
            return
        try:
            sock.setblocking(False)
        except OSError:
            _close(sock)
            return
        with self._lock:
            if self._stopped or len(self._deadlines) >= MAX_LINGERING:
                _close(sock)
                return
            now = time.monotonic()
            self._deadlines[sock] = now + LINGER_SECONDS
            self._awaiting[sock] = now + ANSWER_WITHIN_SECONDS
            self._selector.register(sock, selectors.EVENT_READ)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._drain, name="dicom-refuser", daemon=True
                )
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for sock in list(self._deadlines):
                self._forget(sock)
        thread = self._thread
        if thread is not None:
            thread.join(timeout=2)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                if not self._deadlines:
                    self._thread = None
                    return
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data and not self._answer(sock):
                    data = b""
                if not data:
                    with self._lock:
                        self._forget(sock)
            now = time.monotonic()
            with self._lock:
                silent = [sock for sock, due in self._awaiting.items() if due <= now]
            for sock in silent:
                if not self._answer(sock):
                    with self._lock:
                        self._forget(sock)
            with self._lock:
                for sock, deadline in list(self._deadlines.items()):
                    if deadline <= now:
                        self._forget(sock)

    def _answer(self, sock: socket.socket) -> bool:
        """Send the rejection once (and close our side for writing); False when the socket failed."""
        with self._lock:
            if self._awaiting.pop(sock, None) is None:
                return True
        try:
            sock.send(wire.associate_rj_pdu(*wire.REJECT_LOCAL_LIMIT))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def _forget(self, sock: socket.socket) -> None:
        self._awaiting.pop(sock, None)
        if self._deadlines.pop(sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
