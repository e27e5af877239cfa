"""``dicom-node serve``: start the node's parts, and stop them cleanly on SIGTERM/SIGINT.

Parts run as separate processes where Python's GIL would otherwise serialise them: several
receiver processes share the DICOM port; the main process runs the background loops (completion,
dispatch, reconcile) and the HTTP API; embedded workers are their own processes.

Every child dies with the main process (:mod:`dicom_node.supervision`), so a SIGKILLed node
leaves nothing holding its port. A receiver that dies alone is restarted; more than
``MAX_RESTARTS`` restarts within ``RESTART_WINDOW`` seconds is a crash loop, and the node stops
with exit code 1 so that systemd or the container runtime can act on it.
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
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from dicom_node import audit
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.logs import setup_logging
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, open_database
from dicom_node.supervision import RestartBudget, die_with_parent

LOGGER = logging.getLogger(__name__)

RECEIVER_START_TIMEOUT = 30.0
STOP_GRACE_SECONDS = 10.0
"""How long running associations may finish after SIGTERM before they are aborted."""
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
"""At most MAX_RESTARTS restarts of the node's child processes in any RESTART_WINDOW seconds."""
PART_RESTARTED = "part-restarted"
"""Audit event: a receiver or embedded worker died and was restarted (or, outcome failure, not)."""
EXIT_CRASH_LOOP = 1


def _receiver_main(settings: Settings, index: int, ready: Connection, parent: int) -> None:
    """Entry point of one receiver process; it stops on SIGTERM.

    It shares no lock with its siblings or the parent (a pipe of its own reports "ready", a
    signal says "stop"): a sibling SIGKILLed while holding a ``multiprocessing`` lock or
    sleeping on a ``multiprocessing.Event`` would otherwise hang the others and the stop.
    """
    # First: SIGTERM (an orderly stop, below) when the node's main process dies, even by SIGKILL.
    die_with_parent(parent, signal.SIGTERM)
    setup_logging(settings.log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # A signal handler must not take locks (it interrupts the main thread, which may hold
    # them): it only flips a flag, which the loop below polls.
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    from dicom_node.scp.server import Receiver  # imported here: heavy, and only needed here

    try:
        db = Database(settings.resolved_database_url)
        receiver = Receiver(settings, db)
        receiver.observers.extend(_receiver_observers(settings))
        host, port = receiver.start()
    except Exception as exc:
        ready.send((index, "error", f"{type(exc).__name__}: {exc}"))
        return
    ready.send((index, "ready", f"{host}:{port}"))
    ready.close()
    while not terminated:
        time.sleep(0.2)
    receiver.stop(grace=STOP_GRACE_SECONDS)
    with contextlib.suppress(OSError):
        receiver.spool.sweep_temp(process=True)  # this process's own in-flight files only
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
        self._ready: list[Connection | None] = []
        self._lock_fh: Any = None
        self._exit_code = 0
        self._spool: Spool | None = None
        self.restarts = RestartBudget(MAX_RESTARTS, RESTART_WINDOW)
        """Shared by receivers and embedded workers: one crash loop budget for the node."""
        self.db: Database | None = None

    def request_stop(self, *_: Any) -> None:
        # Called from a signal handler: only flip a flag (see _receiver_main for why).
        self._signalled = True

    def fail(self, reason: str) -> None:
        """Stop the node with a non-zero exit code (a part keeps dying); any thread may call."""
        LOGGER.error("%s; stopping the node (exit code %d)", reason, EXIT_CRASH_LOOP)
        if self.db is not None:
            audit.record(self.db, PART_RESTARTED, actor="node", outcome="failure", reason=reason)
        self._exit_code = EXIT_CRASH_LOOP
        self._stop.set()

    def part_restarted(self, part: str, exit_code: int | None) -> bool:
        """Account for a restart of ``part``; False (and the node stopping) past the budget."""
        if not self.restarts.allow():
            self.fail(
                f"{part} exited (code {exit_code}) after {MAX_RESTARTS} restarts within "
                f"{RESTART_WINDOW:.0f} s: crash loop"
            )
            return False
        LOGGER.warning("%s exited (code %s); restarting it", part, exit_code)
        if self.db is not None:
            audit.record(
                self.db,
                PART_RESTARTED,
                actor="node",
                outcome="warning",
                part=part,
                exit_code=exit_code,
            )
        return True

    def run(self) -> int:
        settings = self.settings
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._lock_data_dir()
        self.db = open_database(settings.resolved_database_url)
        spool = self._spool = Spool(settings.spool_dir, fsync=settings.scp.fsync)
        spool.prepare()
        # Nothing else writes to this spool yet (the data directory is locked): all of its
        # temporary files are leftovers.
        swept = spool.sweep_temp(everyone=True)
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
                spool.sweep_temp(everyone=True)
            audit.record(self.db, audit.NODE_STOPPED, actor="node")
            self.db.dispose()
        return self._exit_code

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

    def _spawn_receiver(self, index: int) -> Any:
        # Started from the main thread only: the parent-death signal follows the thread that
        # started a child (prctl(2)), and this one lives as long as the node.
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_receiver_main,
            args=(self.settings, index, writer, os.getpid()),
            name=f"receiver-{index}",
            daemon=False,
        )
        proc.start()
        writer.close()  # the child's copy only: EOF on ours when it exits
        if index < len(self._receivers):
            self._receivers[index], self._ready[index] = proc, reader
        else:
            self._receivers.append(proc)
            self._ready.append(reader)
        return proc

    def _report(self, index: int) -> str | None:
        """The start report of receiver ``index`` if one is waiting ("ready" or an error)."""
        conn = self._ready[index]
        if conn is None or not conn.poll():
            return None
        try:
            _, state, detail = conn.recv()
        except (EOFError, OSError):
            state, detail = "error", "exited before it was ready"
        conn.close()
        self._ready[index] = None
        return "ready" if state == "ready" else str(detail)

    def _start_receivers(self) -> None:
        for index in range(self.settings.scp.receivers):
            self._spawn_receiver(index)
        deadline = time.monotonic() + RECEIVER_START_TIMEOUT
        pending = set(range(len(self._receivers)))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DicomNodeError("receiver processes did not start in time")
            mp_connection.wait([c for c in self._ready if c is not None], timeout=remaining)
            for index in sorted(pending):
                report = self._report(index)
                if report is None:
                    continue
                if report != "ready":
                    raise DicomNodeError(f"receiver {index} failed to start: {report}")
                pending.discard(index)

    def _check_receivers(self) -> None:
        """Restart receivers that died (not asked to), within the restart budget."""
        for index, proc in enumerate(self._receivers):
            report = self._report(index)
            if report not in (None, "ready"):
                LOGGER.error("%s failed to start: %s", proc.name, report)
            if proc.is_alive() or self._stop.is_set() or self._signalled:
                continue
            proc.join()
            if self._spool is not None:
                with contextlib.suppress(OSError):
                    self._spool.sweep_temp()  # the dead receiver's in-flight files
            if not self.part_restarted(proc.name, proc.exitcode):
                return
            self._spawn_receiver(index)

    def _stop_receivers(self) -> None:
        for proc in self._receivers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: stop accepting, let associations finish
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 10
        for proc in self._receivers:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                LOGGER.warning("receiver %s did not stop; killing it", proc.name)
                proc.kill()
                proc.join(timeout=5)
        for conn in self._ready:
            if conn is not None:
                conn.close()
        self._receivers.clear()
        self._ready.clear()
