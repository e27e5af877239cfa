"""The storage SCP: an AE with our contexts, timeouts and handlers, behind a tuned socket server.

Several receiver processes share one port (SO_REUSEPORT): pynetdicom's cost is Python CPU per
message, and only processes, not threads, spread that over cores (the GIL runs one at a time).
Each process caps its open connections (:mod:`dicom_node.scp.gate`) before a thread exists.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import pydicom.config
import pynetdicom
from pynetdicom import AE, _config
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import audit
from dicom_node.errors import DicomNodeError
from dicom_node.ingest import Ingestor
from dicom_node.scp import incoming, reactor
from dicom_node.scp.contexts import storage_contexts, verification_context
from dicom_node.scp.gate import ConnectionGate, Refuser, Ticket
from dicom_node.scp.handlers import bindings
from dicom_node.scp.reactor import NodeRequestHandler
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database
from dicom_node.tls import server_ssl_context

LOGGER = logging.getLogger(__name__)

STOP_IDLE_SECONDS = 1.0
"""At stop, an association with nothing in flight for this long is aborted without waiting."""


def configure_pynetdicom(settings: Settings, spool: Spool) -> None:
    """Process-wide pynetdicom switches. Called once in each receiver process.

    pynetdicom keeps these as module globals; we set them in the receiver's own process only.
    """
    _config.LOG_HANDLER_LEVEL = "none"  # no per-PDU/DIMSE logging: costs CPU and may leak PHI
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_RECV_CHUNKED_DATASET = True  # receive straight to disk: memory stays bounded
    _config.UNRESTRICTED_STORAGE_SERVICE = settings.scp.accept_unknown_sop_classes
    # pynetdicom's chunked receive writes to tempfile's directory; keep it inside the spool so
    # the final link is on the same file system and aborted transfers are swept with the rest.
    tempfile.tempdir = str(spool.tmp)
    # Incoming datasets go to our sink: memory up to a limit, then the spool; a write error or
    # an oversized dataset becomes A700 instead of aborting the association.
    # The free-space floor is checked when an instance's first data fragment arrives too, so a
    # full disk answers A700 without the instance being buffered or written first.
    incoming.install(settings.scp.max_instance_bytes, spool.check_free_space)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # A receiver reads headers only to index them; its own checks (dicom_node.uids) decide
    # what is refused. pydicom's per-value validation on read cost a regex per UID (several per
    # instance, ~10 % of parse time) and its warnings quote the values.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus SO_REUSEPORT, TCP_NODELAY and a non-blocking accept.

    pynetdicom wraps TLS sockets in ``get_request`` with the handshake done on the accept
    thread, so one silent client could stall every new association. We defer the handshake to
    the connection's own thread, with the network timeout as its deadline, and complete it there
    before pynetdicom sees the socket: a refused peer (no or untrusted certificate, plain TCP)
    becomes one log line and an audit record instead of a DUL error with a traceback.
    """

    reuse_port = True
    daemon_threads = True
    request_queue_size = 128
    """Listen backlog (socketserver's default is 5): a burst of connections waits in the kernel
    for the accept thread, which decides quickly, instead of having its handshakes dropped."""
    on_tls_failure: Callable[[str, str], None] | None = None
    """Called with (peer address, reason) when a TLS handshake fails (audit, metrics)."""
    gate: ConnectionGate | None = None
    """Caps open connections before a thread is started for them (set by :class:`Receiver`)."""
    refuser: Refuser | None = None
    on_refused: Callable[[], None] | None = None
    """Called when a connection is refused over a cap (metrics)."""
    _local = threading.local()

    def server_bind(self) -> None:
        if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Accepted sockets block for ever by default: a peer that stops reading our responses
        # would hold a send (and its thread) for good. Reads set their own deadlines.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Admit the connection through the gate and serve it on its own thread, or refuse it
        here on the accept thread (no thread is started for a refused connection)."""
        if self.gate is None:
            super().process_request(request, client_address)
            return
        host = str(client_address[0]) if isinstance(client_address, tuple) else "-"
        admitted = self.gate.admit(host)
        if not isinstance(admitted, Ticket):
            if self.refuser is not None:
                self.refuser.refuse(request, host, admitted)
            else:
                self.shutdown_request(request)
            if self.on_refused is not None:
                self.on_refused()
            return
        try:
            thread = threading.Thread(
                target=self._serve_admitted, args=(request, client_address, admitted), daemon=True
            )
            thread.start()
        except RuntimeError:  # cannot start a thread: out of resources
            admitted.release()
            self.shutdown_request(request)

    def _serve_admitted(self, request: Any, client_address: Any, ticket: Ticket) -> None:
        self._local.ticket = ticket
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._local.ticket = None
            if ticket.owner is None:  # no association took the connection over
                ticket.release()

    def current_ticket(self) -> Ticket | None:
        """The gate ticket of the connection this thread is setting up (see NodeRequestHandler)."""
        return cast(Ticket | None, getattr(self._local, "ticket", None))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            host = str(client_address[0]) if isinstance(client_address, tuple) else "-"
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.shutdown_request(request)
                if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError):
                    # Closed before saying anything: a port probe or a health check.
                    LOGGER.debug("TLS connection from %s closed before the handshake", host)
                    return
                reason = tls_failure_reason(exc)
                LOGGER.warning("DICOM TLS handshake with %s failed: %s", host, reason)
                if self.on_tls_failure is not None:
                    self.on_tls_failure(host, reason)
                return
        super().process_request_thread(request, client_address)


def tls_failure_reason(exc: BaseException) -> str:
    """A short, patient-free reason for a failed handshake (OpenSSL's reason code)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, TimeoutError | socket.timeout):
        return "handshake timed out"
    return type(exc).__name__


class Receiver:
    """One listening storage SCP in this process, with its ingest pipeline and counters."""

    def __init__(self, settings: Settings, db: Database, *, reuse_port: bool = True) -> None:
        self.settings = settings
        self.db = db
        self.spool = Spool(
            settings.spool_dir, fsync=settings.scp.fsync, min_free_bytes=settings.scp.min_free_bytes
        )
        self.spool.prepare()
        self.ingestor = Ingestor(settings, db, self.spool)
        self.reuse_port = reuse_port
        self.server: NodeAssociationServer | None = None
        self.ae: AE | None = None
        self.gate: ConnectionGate | None = None
        self.refuser: Refuser | None = None
        self.statuses: Counter[int] = Counter()
        self.associations: Counter[str] = Counter()
        self.bytes_received = 0
        self._lock = threading.Lock()
        self.observers: list[Any] = []
        """Callables ``(kind, value, amount)`` notified of statuses and associations (metrics)."""

    # -- observation (metrics hooks) ------------------------------------------------------

    def observe_status(self, status: int, size: int) -> None:
        with self._lock:
            self.statuses[status] += 1
            self.bytes_received += size
        for observer in self.observers:
            observer("status", status, size)

    def observe_association(self, what: str) -> None:
        with self._lock:
            self.associations[what] += 1
        for observer in self.observers:
            observer("association", what, 1)

    # -- life cycle -----------------------------------------------------------------------

    def build_gate(self) -> ConnectionGate:
        scp = self.settings.scp
        return ConnectionGate(scp.max_connections, scp.max_connections_per_host)

    def build_ae(self) -> AE:
        scp = self.settings.scp
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = scp.max_associations
        ae.acse_timeout = scp.acse_timeout
        ae.dimse_timeout = scp.dimse_timeout
        ae.network_timeout = scp.network_timeout
        ae.maximum_pdu_size = scp.max_pdu_size
        ae.require_called_aet = scp.require_called_ae_title
        for abstract_syntax, transfer_syntaxes in storage_contexts(deflated=scp.accept_deflated):
            ae.add_supported_context(abstract_syntax, transfer_syntaxes)
        ae.add_supported_context(*verification_context())
        return ae

    def start(self, port: int | None = None) -> tuple[str, int]:
        """Start listening (non-blocking). Returns the bound (host, port)."""
        if not reactor.supported():
            # pynetdicom's own PDU reader allocates whatever length a peer announces, and its
            # reads have no deadline: the hardening in reactor.py must be in place.
            raise DicomNodeError(
                f"pynetdicom {pynetdicom.__version__} is not supported by this dicom-node "
                f"(needs {' or '.join(v + 'x' for v in reactor.SUPPORTED_PYNETDICOM)})"
            )
        configure_pynetdicom(self.settings, self.spool)
        self.ae = self.build_ae()
        ctx = server_ssl_context(self.settings.scp.tls) if self.settings.scp.tls.enabled else None
        address = (self.settings.bind, self.settings.dicom_port if port is None else port)
        NodeAssociationServer.reuse_port = self.reuse_port
        server = self.ae.make_server(
            address,
            ae_title=self.settings.ae_title,
            contexts=None,
            ssl_context=ctx,
            evt_handlers=bindings(self),
            server_class=NodeAssociationServer,
            request_handler=NodeRequestHandler,
        )
        assert isinstance(server, NodeAssociationServer)
        reactor.share_contexts(server.contexts)
        server.on_tls_failure = self._tls_failed
        server.gate = self.gate = self.build_gate()
        server.refuser = self.refuser = Refuser()
        server.on_refused = self._refused
        self.server = server
        thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        host, bound_port = server.server_address[:2]
        return str(host), int(bound_port)

    def _refused(self) -> None:
        # Metrics only: a flood must not become a flood of audit rows.
        self.observe_association("rejected")

    def _tls_failed(self, host: str, reason: str) -> None:
        self.observe_association("rejected")
        audit.record(
            self.db,
            audit.ASSOCIATION_REJECTED,
            actor=f"-@{host}",
            outcome="failure",
            reason=f"TLS handshake failed: {reason}",
        )

    @property
    def active_associations(self) -> int:
        if self.server is None:
            return 0
        return len([a for a in self.server.active_associations if a.is_alive()])

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let running associations finish for ``grace`` s, then abort them.

        Connections not (yet) associated have nothing to finish and are closed at once. An
        aborted transfer leaves at most a temporary file, never a partial file under a final
        name; temporary files are swept.
        """
        server = self.server
        if server is None:
            return
        active = list(server.active_associations)
        # Stop the accept loop and close the listening socket (not the associations).
        socketserver_shutdown(server)
        if server.socket is not None:
            server.socket.close()
        if self.refuser is not None:
            self.refuser.stop()
        for assoc in active:
            if not assoc.is_established:
                _close_transport(assoc)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(a.is_alive() for a in active):
            for assoc in active:
                # Nothing in flight for a while (between instances, or a stalled peer): no
                # reason to spend the grace on it.
                if (
                    assoc.is_alive()
                    and isinstance(assoc, reactor.NodeAssociation)
                    and assoc.is_established
                    and assoc.is_idle(STOP_IDLE_SECONDS)
                ):
                    assoc.abort(block=False)
            time.sleep(0.05)
        stragglers = [a for a in active if a.is_alive()]
        for assoc in stragglers:
            if assoc.is_established:
                assoc.abort(block=False)  # queue an A-ABORT for the DUL thread to send
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and any(a.is_alive() for a in stragglers):
            time.sleep(0.05)
        for assoc in stragglers:
            _close_transport(assoc)
        deadline = time.monotonic() + 5
        for assoc in active:
            assoc.join(timeout=max(deadline - time.monotonic(), 0.01))
        self.spool.sweep_temp()
        self.server = None


def _close_transport(assoc: Any) -> None:
    """Shut the association's connection down under its DUL thread, which then sees the close
    (its reads end at once) and winds the association up."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def socketserver_shutdown(server: ThreadedAssociationServer) -> None:
    """Stop ``serve_forever`` without aborting associations (pynetdicom's shutdown does more)."""
    import socketserver

    socketserver.BaseServer.shutdown(server)
    if server.ae and server in server.ae._servers:
        server.ae._servers.remove(server)
