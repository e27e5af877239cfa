"""Lower per-message latency in pynetdicom's acceptor, without spending CPU on idle associations.

pynetdicom 3.0 runs two polling loops per association:

* the association thread sleeps 1 ms between looks at its DIMSE message queue, so every
  received C-STORE waits on average ~0.5 ms (up to ~1.1 ms) before its handler runs;
* the DUL (network) thread sleeps 1 ms whenever it had nothing to do, so both the next
  request from the peer and our response wait up to another ~1 ms, and while it polls it
  costs CPU that the handler thread needs.

With synchronous C-STORE (one request in flight per association, which is what modalities and
``storescu`` do) these waits add up to ~1.5 ms per instance on a ~4 ms budget
(capping the sleeps cut one-association ``storescu`` wall time over loopback by 9-14 %).

:class:`NodeAssociation` waits on the message queue's condition (woken at once by the DUL
thread's ``put``) instead of sleeping; :class:`NodeDUL` waits in ``select`` on the socket and a
wake-up pipe that our responses write to, so it too wakes at once, and an idle association still
wakes only once a millisecond, as before. They are swapped in by :class:`NodeRequestHandler`; the receiver refuses
to start on a pynetdicom version whose reactor loop they do not mirror (:func:`supported`).

They also hold the line against hostile peers, which pynetdicom 3.0 does not:

* :meth:`NodeDUL._read_pdu_data` checks a PDU's header (:mod:`dicom_node.scp.wire`) before it
  reads, or allocates, the body, and reads with a deadline: a PDU must be complete within the
  network timeout (before association: within the ACSE timeout, PS3.8 9.1.5 ARTIM), so a peer
  sending half a header or a byte a second is dropped instead of holding a thread for ever;
* :meth:`NodeAssociation.run` ends as soon as the connection is gone before association,
  instead of waiting out the ACSE timeout, and gives the connection's place back to the
  receiver's :class:`~dicom_node.scp.gate.ConnectionGate`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import select
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import set_timer_resolution

from dicom_node.scp import wire

LOGGER = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = ("3.0.",)
"""Versions whose ``Association._run_reactor`` the loop below mirrors."""

IDLE_POLL_SECONDS = 0.001  # pynetdicom's own polling interval
STOP_CHECK_SECONDS = 0.2
"""How often a blocked read looks whether its association is being aborted (stop, timeout)."""


def supported() -> bool:
    """True when this pynetdicom's reactor and PDU reader are the ones the classes here mirror."""
    return pynetdicom.__version__.startswith(SUPPORTED_PYNETDICOM)


class _Abandoned(Exception):
    """A PDU read given up because the association is being aborted."""


class _PeerTooSlow(Exception):
    """A PDU not complete by its deadline."""


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

    # -- reading PDUs: header checked first, bounded buffer, deadline --------------------------

    _desynced = False

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0.4 ``DULServiceProvider._read_pdu_data``, hardened.

        The header is checked (:func:`wire.check_header`) before the body is read; a refused
        header gets an A-ABORT and the connection is closed. The whole PDU must arrive by
        :meth:`_pdu_deadline`. A closed, timed-out or refused connection becomes Evt17
        (transport closed), as a peer's close does in pynetdicom.
        """
        sock = cast(NodeAssociationSocket, self.socket)
        if self._desynced:  # a PDU read was abandoned half way: the stream is unusable
            sock.close()
            return
        host = self.assoc.requestor.address
        deadline = self._pdu_deadline()
        try:
            header = sock.read_exactly(wire.HEADER_LENGTH, deadline, self._abandon)
            _, length = wire.check_header(
                header, max_pdata=wire.pdata_cap(self.assoc.acceptor.maximum_length or 0)
            )
            body = sock.read_exactly(length, deadline, self._abandon)
        except wire.PduRefused as exc:
            LOGGER.warning("A-ABORT to %s: %s", host, str(exc))
            self._close_transport(wire.abort_pdu(exc.reason))
            return
        except _PeerTooSlow:
            LOGGER.warning("connection from %s closed: PDU not complete in time", host)
            self._close_transport()
            return
        except _Abandoned:
            self._desynced = True
            return
        except (OSError, EOFError):
            self._close_transport()
            return
        header += body
        try:
            pdu, event = self._decode_pdu(header)
        except Exception as exc:  # pynetdicom's READ_PDU_EXC_F: any decoder failure is Evt19
            LOGGER.warning("undecodable PDU from %s: %s", host, type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _close_transport(self, last_words: bytes = b"") -> None:
        """Send ``last_words`` if the socket takes them now, close it; Evt17 unless idle."""
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket
        if raw is not None and last_words:
            with contextlib.suppress(OSError, ValueError):
                raw.settimeout(0)  # a peer that does not read gets no wait from us
                raw.send(last_words)
        if self.state_machine.current_state == "Sta1" and self.event_queue.empty():
            # Idle, nothing pending (not even the connection's own Evt5): no one left to tell
            sock._shutdown_socket()
            sock.socket = None
            return
        sock.close()  # Evt17: transport connection closed

    def _pdu_timeout(self) -> float:
        if self.state_machine.current_state in ("Sta1", "Sta2", "Sta13"):
            # ARTIM runs (PS3.8 9.1.5): waiting for the A-ASSOCIATE-RQ, or for the close. (Sta1:
            # the connection's Evt5 is still queued, ARTIM not yet started: its full timeout.)
            return max(float(self.artim_timer.remaining), 0.0)
        return float(self.network_timeout or 60.0)

    def _pdu_deadline(self) -> float:
        """When the PDU now arriving must be complete."""
        return time.monotonic() + self._pdu_timeout()

    def _abandon(self) -> bool:
        """True when a blocked read should give up: the association is being aborted."""
        if self._kill_thread:
            return True
        return any(isinstance(p, A_ABORT | A_P_ABORT) for p in list(self.to_provider_queue.queue))


class NodeAssociation(Association):
    """An acceptor association whose reactor wakes when a DIMSE message arrives."""

    gate_ticket: Any = None
    """The receiver's :class:`~dicom_node.scp.gate.Ticket` for this connection."""
    serving = False
    """True while a request's handler runs."""

    def is_idle(self, seconds: float) -> bool:
        """True when nothing is in flight: no handler running, no message partly received or
        queued, and no complete PDU for ``seconds`` (a stalled or silent peer looks like this;
        a sender in the middle of an instance does not)."""
        if self.serving or self.dimse.message is not None or not self.dimse.msg_queue.empty():
            return False
        timer = self.dul._idle_timer
        if timer.timeout is None:
            return False
        return float(timer.timeout) - float(timer.remaining) >= seconds

    def run(self) -> None:
        try:
            if self.is_acceptor:
                self._run_acceptor()
            else:  # pragma: no cover - we only build acceptors
                super().run()
        finally:
            if self.gate_ticket is not None:
                self.gate_ticket.release()

    def _run_acceptor(self) -> None:
        # pynetdicom 3.0.4 Association.run_reactor, acceptor branch, with _wait_for_request
        # in place of one wait of the whole ACSE timeout.
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()

        primitive = self._wait_for_request()
        if primitive is None:
            self.kill()
            sock = cast(AssociationSocket, self.dul.socket)
            if self._server and sock.socket:
                self._server.shutdown_request(sock.socket)
            return

        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        if self.is_established:
            with set_timer_resolution(self._timer_resolution):
                self._run_reactor()

        sock = cast(AssociationSocket, self.dul.socket)
        if self._server and sock.socket:
            self._server.shutdown_request(sock.socket)

    def _wait_for_request(self) -> Any:
        """The peer's A-ASSOCIATE request, or None after the ACSE timeout or once the DUL
        closed the connection (refused PDU, half a header at the ARTIM deadline, peer gone)."""
        deadline = time.monotonic() + float(self.acse_timeout or 60.0)
        sock = cast(AssociationSocket, self.dul.socket)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            primitive = self.dul.receive_pdu(wait=True, timeout=min(left, STOP_CHECK_SECONDS))
            if primitive is not None:
                return primitive
            if sock.socket is None or not self.dul.is_alive():
                return None

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
                self.serving = True
                try:
                    self._serve_request(msg, cast(int, context_id))
                finally:
                    self.serving = False

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
    """pynetdicom's socket, reading a PDU with ``recv_into`` and a deadline.

    ``recv_into`` instead of 4 KiB ``recv`` calls: a 128 KiB P-DATA PDU took 32 ``recv`` calls
    and as many ``bytearray.extend`` copies (~0.3 ms of CPU per 512 KB instance,
    measured over loopback). The buffer never runs more than :data:`wire.READ_CHUNK`
    ahead of the bytes that really arrived.
    """

    send_timeout: float | None = None
    """The socket's timeout outside reads (sends: a peer that stops reading is dropped)."""

    def read_exactly(
        self, nr_bytes: int, deadline: float, abandon: Callable[[], bool]
    ) -> bytearray:
        """``nr_bytes`` from the peer by ``deadline`` (``time.monotonic``).

        Raises :class:`EOFError` when the peer closes first, :class:`_PeerTooSlow` at the
        deadline and :class:`_Abandoned` as soon as ``abandon()`` is true (checked every
        :data:`STOP_CHECK_SECONDS` while waiting).
        """
        sock = cast(Any, self.socket)
        if sock is None:
            raise EOFError
        buffer = bytearray(min(nr_bytes, wire.READ_CHUNK))
        nr_read = 0
        sock.settimeout(STOP_CHECK_SECONDS)
        try:
            while nr_read < nr_bytes:
                if nr_read == len(buffer):  # full: double it, never past the announced length
                    buffer += bytes(min(len(buffer), nr_bytes - nr_read))
                with memoryview(buffer) as view:
                    got = self._recv_into(sock, view[nr_read:], deadline, abandon)
                if not got:
                    raise EOFError
                nr_read += got
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.send_timeout)
        return buffer

    @staticmethod
    def _recv_into(
        sock: Any, view: memoryview, deadline: float, abandon: Callable[[], bool]
    ) -> int:
        while True:
            if abandon():
                raise _Abandoned
            if time.monotonic() >= deadline:
                raise _PeerTooSlow
            try:
                return int(sock.recv_into(view, len(view)))
            except (TimeoutError, ssl.SSLWantReadError):
                continue


class SharedContext(PresentationContext):
    """A supported presentation context that each association copies cheaply.

    pynetdicom 3.0 gives every association ``deepcopy(server.contexts)``: with ~170 storage
    SOP classes times their transfer syntaxes that is ~2,700 UIDs, each re-validated by
    pydicom, ~58 ms of CPU per association (``benchmarks/profile_ingest.py``). Negotiation
    (``pynetdicom.presentation.negotiate_as_acceptor``) only reads the acceptor's contexts and
    builds new ones for the result, so a copy that shares the (immutable) UIDs is as safe.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def share_contexts(contexts: list[PresentationContext]) -> None:
    """Make the server's supported contexts :class:`SharedContext` (copied per association)."""
    for context in contexts:
        if type(context) is PresentationContext:
            context.__class__ = SharedContext


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, building :class:`NodeAssociation` objects."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        if not supported():  # the receiver refuses to start; this is a second line
            raise RuntimeError(f"pynetdicom {pynetdicom.__version__} is not supported")
        assoc.__class__ = NodeAssociation
        assoc.dul.__class__ = NodeDUL
        assoc.dul.daemon = True  # never keep the process alive at exit (pynetdicom: False)
        sock = cast(NodeAssociationSocket, assoc.dul.socket)
        sock.__class__ = NodeAssociationSocket
        sock.send_timeout = self.ae.network_timeout
        assoc.dimse.__class__ = NodeDIMSE
        return assoc

    def handle(self) -> None:
        # pynetdicom 3.0.4 RequestHandler.handle, handing the connection's gate ticket to the
        # association (which gives it back when its thread ends).
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        ticket = getattr(self.server, "current_ticket", lambda: None)()
        assoc.gate_ticket = ticket
        assoc.start()
        if ticket is not None:
            ticket.owner = assoc
