"""Lower per-message latency in pynetdicom's acceptor, without spending CPU on idle associations.

pynetdicom 3.0 runs two polling loops per association:

* the association thread sleeps 1 ms between looks at its DIMSE message queue, so every
  received C-STORE waits on average ~0.5 ms (up to ~1.1 ms) before its handler runs;
* the DUL (network) thread sleeps 1 ms whenever it had nothing to do, so both the next
  request from the peer and our response wait up to another ~1 ms, and while it polls it
  costs CPU that the handler thread needs.

With synchronous C-STORE (one request in flight per association, which is what modalities and
``storescu`` do) these waits add up to ~1.5 ms per instance on a ~4 ms budget
(``research/performance.md`` §2.3: capping the sleeps cut one-association wall time by 9-14 %).

:class:`NodeAssociation` waits on the message queue's condition (woken at once by the DUL
thread's ``put``) instead of sleeping; :class:`NodeDUL` waits in ``select`` on the socket and a
wake-up pipe that our responses write to, so it too wakes at once, and an idle association still
wakes only once a millisecond, as before. Both are swapped in by :class:`NodeRequestHandler` only
for the pynetdicom versions whose reactor loop they mirror; otherwise pynetdicom's own classes run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import ssl
import struct
import threading
import time
import weakref
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

LOGGER = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = ("3.0.",)
"""Versions whose ``Association._run_reactor`` the loop below mirrors."""

IDLE_POLL_SECONDS = 0.001  # pynetdicom's own polling interval


def supported() -> bool:
    return pynetdicom.__version__.startswith(SUPPORTED_PYNETDICOM)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class NodeDUL(DULServiceProvider):
    """pynetdicom's DUL, waiting in ``select`` on the socket and a wake-up pipe instead of
    sleeping: it reacts at once to the peer's next PDU and to our response, and an idle
    association still wakes only every millisecond, as before."""

    _wake: tuple[int, int] | None = None

    @property
    def _run_loop_delay(self) -> float:
        # The DUL loop's own sleep becomes a yield: the wait happens in _is_transport_event.
        # Other threads (stop_dul waits on this value) keep pynetdicom's 1 ms.
        return 0.0 if threading.current_thread() is self else IDLE_POLL_SECONDS

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:  # pynetdicom's __init__ sets it
        pass

    def _wake_fds(self) -> tuple[int, int]:
        if self._wake is None:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._wake = (r, w)
            weakref.finalize(self, _close_fds, r, w)
        return self._wake

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        with contextlib.suppress(OSError):  # a full pipe already means "wake up"
            os.write(self._wake_fds()[1], b"\0")

    def _is_transport_event(self) -> bool:
        self._wait_for_work()
        return bool(super()._is_transport_event())

    def _wait_for_work(self) -> None:
        """Block up to 1 ms until the peer sent data or we queued something to send."""
        if not self.event_queue.empty() or not self.to_provider_queue.empty():
            return
        sock = self.socket.socket if self.socket is not None else None
        if sock is None or sock.fileno() < 0:
            time.sleep(IDLE_POLL_SECONDS)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        r, _ = self._wake_fds()
        try:
            ready, _, _ = select.select([sock.fileno(), r], [], [], IDLE_POLL_SECONDS)
        except (OSError, ValueError):
            return
        if r in ready:
            with contextlib.suppress(OSError):
                while os.read(r, 4096):
                    pass


class NodeAssociation(Association):
    """An acceptor association whose reactor wakes when a DIMSE message arrives."""

    def _wait_for_message(self, timeout: float) -> None:
        queue = self.dimse.msg_queue
        with queue.not_empty:
            if not queue._qsize():
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


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_c_store_rsp(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int
) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), Implicit VR Little Endian.

    The same bytes pynetdicom builds through a pydicom dataset and its encoder, which cost a
    third of the association thread's CPU per instance.
    """
    body = b"".join(
        (
            _implicit(0x0000, 0x0002, _uid(sop_class_uid)),
            _implicit(0x0000, 0x0100, struct.pack("<H", 0x8001)),
            _implicit(0x0000, 0x0120, struct.pack("<H", message_id)),
            _implicit(0x0000, 0x0800, struct.pack("<H", 0x0101)),
            _implicit(0x0000, 0x0900, struct.pack("<H", status)),
            _implicit(0x0000, 0x1000, _uid(sop_instance_uid)),
        )
    )
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


class NodeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with a direct encoder for plain C-STORE responses."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.AffectedSOPClassUID
            and primitive.AffectedSOPInstanceUID
            and isinstance(primitive.Status, int)
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_c_store_rsp(
                int(primitive.MessageIDBeingRespondedTo),
                str(primitive.AffectedSOPClassUID),
                str(primitive.AffectedSOPInstanceUID),
                int(primitive.Status),
            )
            if not self.maximum_pdu_size or len(command) + 6 <= self.maximum_pdu_size:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


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
            assoc.dimse.__class__ = NodeDIMSE
        return assoc
