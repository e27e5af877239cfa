"""Lower per-message latency in pynetdicom's acceptor, without spending CPU on idle associations.

pynetdicom 3.0 runs two polling loops per association:

* the association thread sleeps 1 ms between looks at its DIMSE message queue, so every
  received C-STORE waits on average ~0.5 ms (up to ~1.1 ms) before its handler runs;
* the DUL (network) thread sleeps 1 ms whenever it had nothing to do, so both the next
  request from the peer and our response wait up to another ~1 ms.

With synchronous C-STORE (one request in flight per association, which is what modalities and
``storescu`` do) these waits add up to ~1.5 ms per instance on a ~4 ms budget
(``research/performance.md`` §2.3: capping the sleeps cut one-association wall time by 9-14 %).

:class:`NodeAssociation` waits on the message queue's condition (woken at once by the DUL
thread's ``put``) instead of sleeping; :class:`NodeDUL` polls every 100 µs while its association
is busy (data seen in the last 50 ms) and falls back to pynetdicom's 1 ms when idle, so idle
associations cost what they did before. Both are swapped in by :class:`NodeRequestHandler` only
for the pynetdicom versions whose reactor loop they mirror; otherwise pynetdicom's own classes run.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

LOGGER = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = ("3.0.",)
"""Versions whose ``Association._run_reactor`` the loop below mirrors."""

BUSY_POLL_SECONDS = 0.0001
IDLE_POLL_SECONDS = 0.001  # pynetdicom's own value
BUSY_WINDOW_SECONDS = 0.05


def supported() -> bool:
    return pynetdicom.__version__.startswith(SUPPORTED_PYNETDICOM)


class NodeDUL(DULServiceProvider):
    """pynetdicom's DUL, polling fast only while its association is busy."""

    _busy_until = 0.0

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        return BUSY_POLL_SECONDS if time.monotonic() < self._busy_until else IDLE_POLL_SECONDS

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:  # pynetdicom's __init__ sets it
        pass

    def _is_transport_event(self) -> bool:
        seen = super()._is_transport_event()
        if seen:
            self._busy_until = time.monotonic() + BUSY_WINDOW_SECONDS
        return seen

    def _process_recv_primitive(self) -> bool:
        sent = super()._process_recv_primitive()
        if sent:
            self._busy_until = time.monotonic() + BUSY_WINDOW_SECONDS
        return sent


class NodeAssociation(Association):
    """An acceptor association whose reactor wakes when a DIMSE message arrives."""

    def _wait_for_message(self, timeout: float) -> None:
        queue = self.dimse.msg_queue
        with queue.not_empty:
            if not queue._qsize():  # type: ignore[attr-defined]
                queue.not_empty.wait(timeout)

    def _run_reactor(self) -> None:
        # pynetdicom 3.0.4 Association._run_reactor, with the 1 ms sleep at the top of the loop
        # replaced by a wait of at most 1 ms that ends when a message is queued.
        self._is_paused = False
        while not self._kill:
            self._wait_for_message(0.001)

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.warning("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class NodeAssociationSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU with ``recv_into`` instead of 4 KiB ``recv`` calls.

    A 128 KiB P-DATA PDU took 32 ``recv`` calls and as many ``bytearray.extend`` copies
    (~0.3 ms of CPU per 512 KB instance, ``research/performance.md`` §3).
    """

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(Any, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                got = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not got:  # connection closed: return what we have, as pynetdicom does
                    break
                nr_read += got
        finally:
            view.release()
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, building :class:`NodeAssociation` objects."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        if supported():
            assoc.__class__ = NodeAssociation
            assoc.dul.__class__ = NodeDUL
            assoc.dul.socket.__class__ = NodeAssociationSocket
        return assoc
