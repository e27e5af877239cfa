"""The background sender of audit messages to a syslog collector (see :mod:`dicom_node.atna`)."""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
from typing import Any

from dicom_node import audit
from dicom_node.atna.messages import audit_message, kind_of, syslog_frame
from dicom_node.metrics import created_once
from dicom_node.settings import AuditSyslogSettings
from dicom_node.state import Database, Study
from dicom_node.tls import bcp195_context, load_chain

LOGGER = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0
"""Longest wait between two attempts to reach the collector."""


@created_once
def _counter() -> Any:
    from prometheus_client import Counter

    counter = Counter(
        "dicom_node_audit_export_messages",
        "Audit messages for the syslog collector, by outcome (sent, or dropped: queue full, "
        "collector unreachable at shutdown, or a record that could not be encoded).",
        ["outcome"],
    )
    counter.labels(outcome="sent")
    counter.labels(outcome="dropped")
    return counter


class SyslogExporter:
    """Sends the audit records of this process to ``audit.syslog`` (see the module docstring).

    :meth:`start` subscribes it to :mod:`dicom_node.audit` and starts its thread; :meth:`close`
    stops both, sending what is queued while the collector answers."""

    def __init__(self, settings: AuditSyslogSettings, node_name: str, db: Database | None) -> None:
        self.settings = settings
        self.node_name = node_name
        self.source_id = settings.audit_source_id or node_name
        self.db = db
        self.host = socket.gethostname() or "-"
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[audit.Record | None] = queue.Queue(settings.queue_size)
        self._closing = threading.Event()
        self._sock: socket.socket | None = None
        self._ssl = self._ssl_context() if settings.tls else None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._unsubscribe: Any = None

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = bcp195_context(ssl.PROTOCOL_TLS_CLIENT)
        if self.settings.ca_certificates:
            ctx.load_verify_locations(cafile=str(self.settings.ca_certificates))
        else:
            ctx.load_default_certs()
        if self.settings.certificate:
            load_chain(ctx, self.settings.certificate, self.settings.private_key, "audit.syslog")
        return ctx

    def start(self) -> SyslogExporter:
        """Subscribe to the audit trail and start sending."""
        _counter()
        self._thread.start()
        self._unsubscribe = audit.subscribe(self.offer)
        return self

    def offer(self, record: audit.Record) -> None:
        """Queue ``record`` if its event is exported; never blocks (a full queue drops it)."""
        if kind_of(record) is None or self._closing.is_set():
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking records; send what is queued (dropped if the collector is down)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        self._disconnect()

    # -- the sending thread ------------------------------------------------------------------

    def _drop(self, count: int = 1) -> None:
        self.dropped += count
        _counter().labels(outcome="dropped").inc(count)

    def _frame(self, record: audit.Record) -> bytes | None:
        kind = kind_of(record)
        if kind is None:
            return None
        message = audit_message(
            record,
            kind,
            source_id=self.source_id,
            node_name=self.node_name,
            host=self.host,
            study=self._study(record) if kind.study else None,
        )
        return syslog_frame(message, record, host=self.host, app_name=self.node_name)

    def _study(self, record: audit.Record) -> str | None:
        mode = self.settings.participant
        if mode == "none" or record.study_key is None:
            return None
        if mode == "study-key" or self.db is None:
            return record.study_key
        from sqlalchemy import select

        with self.db.session() as s:
            uid = s.scalar(
                select(Study.study_instance_uid).where(Study.study_key == record.study_key)
            )
        return uid or record.study_key

    def _run(self) -> None:
        backoff = 0.5
        pending: bytes | None = None
        while True:
            if pending is None:
                record = self._queue.get()
                if record is None:
                    return
                try:
                    pending = self._frame(record)
                except Exception as exc:  # a record that cannot be encoded is dropped, counted
                    LOGGER.error(
                        "audit message for %s not encoded: %s", record.event, type(exc).__name__
                    )
                    self._drop()
                    continue
                if pending is None:
                    continue
            try:
                self._send(pending)
            except OSError as exc:
                self._disconnect()
                if self._closing.is_set():
                    self._drop(1 + self._discard_queue())
                    return
                LOGGER.warning(
                    "audit collector %s:%d unreachable (%s); retrying in %.1f s",
                    self.settings.host,
                    self.settings.port,
                    type(exc).__name__,
                    backoff,
                )
                self._closing.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            self.sent += 1
            _counter().labels(outcome="sent").inc()
            pending, backoff = None, 0.5

    def _discard_queue(self) -> int:
        count = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return count
            count += item is not None

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is not None and _peer_closed(sock):
            self._disconnect()
            sock = None
        if sock is None:
            raw = socket.create_connection(
                (self.settings.host, self.settings.port), timeout=self.settings.timeout
            )
            try:
                sock = (
                    self._ssl.wrap_socket(raw, server_hostname=self.settings.host)
                    if self._ssl is not None
                    else raw
                )
            except (OSError, ssl.SSLError):
                raw.close()
                raise
            self._sock = sock
        sock.sendall(data)

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _peer_closed(sock: socket.socket) -> bool:
    """True when the collector has closed the connection (a syslog collector never writes, so
    a readable socket means end of stream; over TLS it may also be a TLS 1.3 session ticket)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if not isinstance(sock, ssl.SSLSocket):
            return not sock.recv(1, socket.MSG_PEEK)
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return sock.recv(1) == b""
        except ssl.SSLWantReadError:  # only TLS records of the session itself arrived
            return False
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True
