"""``dicom-node serve``: start the node's parts, and stop them cleanly on SIGTERM/SIGINT.

Parts run as separate processes where Python's GIL would otherwise serialise them: several
receiver processes share the DICOM port; the main process runs the background loops (completion,
dispatch, reconcile) and the HTTP API; embedded workers are their own processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node import audit
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.logs import setup_logging
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, open_database

LOGGER = logging.getLogger(__name__)

RECEIVER_START_TIMEOUT = 30.0
STOP_GRACE_SECONDS = 10.0
"""How long running associations may finish after SIGTERM before they are aborted."""


def _receiver_main(settings: Settings, index: int, ready: Any, stop: Any) -> None:
    """Entry point of one receiver process."""
    setup_logging(settings.log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # A signal handler must not call Event.set(): it runs on the main thread, possibly while
    # that thread holds the event's internal lock inside wait(), and would deadlock. It only
    # flips a flag; the loop below polls it.
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    from dicom_node.scp.server import Receiver  # imported here: heavy, and only needed here

    try:
        db = Database(settings.resolved_database_url)
        receiver = Receiver(settings, db)
        receiver.observers.extend(_receiver_observers(settings))
        host, port = receiver.start()
    except Exception as exc:
        ready.put((index, "error", f"{type(exc).__name__}: {exc}"))
        return
    ready.put((index, "ready", f"{host}:{port}"))
    while not terminated and not stop.wait(0.5):
        pass
    receiver.stop(grace=STOP_GRACE_SECONDS)
    db.dispose()


def _receiver_observers(settings: Settings) -> list[Callable[[str, Any, int], None]]:
    """Metrics hooks for receivers (registered by dicom_node.metrics when available)."""
    try:
        from dicom_node.metrics import receiver_observer
    except ImportError:
        return []
    return [receiver_observer]


@dataclass
class NodeService:
    """The running node. ``run()`` blocks until a stop signal arrives."""

    settings: Settings
    extra_components: list[Any] = field(default_factory=list)
    """Objects with ``start()``/``stop()`` started after the receivers (loops, HTTP, workers)."""
    config_path: str | None = None
    """The configuration file the node was started with (passed on to embedded workers)."""

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._signalled = False
        self._ctx = mp.get_context("spawn")
        self._receivers: list[Any] = []
        self._receiver_stop = self._ctx.Event()
        self._lock_fh: Any = None
        self.db: Database | None = None

    def request_stop(self, *_: Any) -> None:
        # Called from a signal handler: only flip a flag (see _receiver_main for why).
        self._signalled = True

    def run(self) -> int:
        settings = self.settings
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._lock_data_dir()
        self.db = open_database(settings.resolved_database_url)
        spool = Spool(settings.spool_dir, fsync=settings.scp.fsync)
        spool.prepare()
        swept = spool.sweep_temp()
        if swept:
            LOGGER.info("removed %d temporary files left by an earlier run", swept)
        audit.record(self.db, audit.NODE_STARTED, actor="node", ae_title=settings.ae_title)
        started: list[Any] = []
        try:
            self._check_port_free(settings.bind, settings.dicom_port)
            self._start_receivers()
            for component in self.extra_components:
                component.start()
                started.append(component)
            LOGGER.info(
                "dicom-node listening as %s on %s:%d (%d receiver processes)",
                settings.ae_title,
                settings.bind,
                settings.dicom_port,
                settings.scp.receivers,
            )
            while not self._signalled and not self._stop.is_set():
                time.sleep(0.5)
                self._check_receivers()
        finally:
            for component in reversed(started):
                with contextlib.suppress(Exception):
                    component.stop()
            self._stop_receivers()
            # Every writer of the spool (HTTP, receivers) has stopped by now. A receiver that had
            # to be killed, or whose aborted association was still writing when it swept, leaves
            # its in-flight temporary file behind: sweep once more so none outlives the node.
            with contextlib.suppress(OSError):
                spool.sweep_temp()
            audit.record(self.db, audit.NODE_STOPPED, actor="node")
            self.db.dispose()
        return 0

    # -- parts --------------------------------------------------------------------------------

    def _lock_data_dir(self) -> None:
        data_dir = Path(self.settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = (data_dir / "node.lock").open("w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(
                f"another dicom-node is already running with data directory {data_dir}"
            ) from None

    @staticmethod
    def _check_port_free(host: str, port: int) -> None:
        # Receivers bind with SO_REUSEPORT, which would silently share the port with any other
        # process doing the same; a plain bind first makes a conflict an error.
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        # SO_REUSEADDR: connections of a previous run in TIME_WAIT must not count as "in use";
        # a socket still listening (with or without SO_REUSEPORT) still makes the bind fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"DICOM port {host}:{port} is already in use") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        finally:
            probe.close()

    def _start_receivers(self) -> None:
        ready = self._ctx.Queue()
        for index in range(self.settings.scp.receivers):
            proc = self._ctx.Process(
                target=_receiver_main,
                args=(self.settings, index, ready, self._receiver_stop),
                name=f"receiver-{index}",
                daemon=False,
            )
            proc.start()
            self._receivers.append(proc)
        deadline = time.monotonic() + RECEIVER_START_TIMEOUT
        pending = set(range(len(self._receivers)))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DicomNodeError("receiver processes did not start in time")
            try:
                index, state, detail = ready.get(timeout=remaining)
            except Exception:
                continue
            if state != "ready":
                raise DicomNodeError(f"receiver {index} failed to start: {detail}")
            pending.discard(index)

    def _check_receivers(self) -> None:
        for proc in self._receivers:
            if not proc.is_alive() and not self._stop.is_set():
                LOGGER.error(
                    "receiver %s exited (code %s); stopping the node", proc.name, proc.exitcode
                )
                self._stop.set()

    def _stop_receivers(self) -> None:
        self._receiver_stop.set()
        for proc in self._receivers:
            proc.join(timeout=STOP_GRACE_SECONDS + 10)
            if proc.is_alive():
                LOGGER.warning("receiver %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join(timeout=5)
        self._receivers.clear()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
