"""Worker processes started by ``dicom-node serve`` itself (the single-machine setup).

They are ordinary ``dicom-node worker`` processes (real Celery workers), started with the same
environment and configuration file as the node, stopped on shutdown. Each gets SIGTERM (Celery's
warm shutdown: the running task finishes, a job that cannot is taken over through its lease)
when the node's main process dies, even by SIGKILL; Celery's own pool children get SIGKILL when
their worker dies (celery.concurrency.prefork sets it). A worker that exits while the node runs
is restarted after ``RESTART_DELAY`` seconds, within the node's restart budget
(:class:`dicom_node.service.NodeService`); past it the node stops with exit code 1.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Protocol

from dicom_node.settings import Settings
from dicom_node.supervision import RestartBudget, parent_death_hook

LOGGER = logging.getLogger(__name__)

RESTART_DELAY = 5.0


class Supervisor(Protocol):
    def part_restarted(self, part: str, exit_code: int | None) -> bool: ...


class _OwnBudget:
    """The restart budget when no node supervises (a bare ``EmbeddedWorkers``)."""

    def __init__(self) -> None:
        self.budget = RestartBudget(5, 60.0)

    def part_restarted(self, part: str, exit_code: int | None) -> bool:
        if self.budget.allow():
            LOGGER.warning("%s exited (code %s); restarting it", part, exit_code)
            return True
        LOGGER.error("%s exited (code %s) too often; not restarting it", part, exit_code)
        return False


class EmbeddedWorkers:
    def __init__(
        self,
        settings: Settings,
        config_path: str | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.settings = settings
        self.count = settings.embedded_worker_count
        self.config_path = config_path or os.environ.get("DICOM_NODE_CONFIG")
        self.supervisor: Supervisor = supervisor or _OwnBudget()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def _command(self, index: int) -> list[str]:
        cmd = [sys.executable, "-m", "dicom_node"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        queues = ",".join(sorted({*self.settings.worker.queues, "delivery"}))
        return [*cmd, "worker", "--queues", queues, "--name", f"embedded{index}"]

    def _spawn(self, index: int) -> None:
        proc = subprocess.Popen(
            self._command(index),
            start_new_session=True,
            preexec_fn=parent_death_hook(signal.SIGTERM),  # prctl only: no locks, no allocation
        )
        self.procs[index] = proc
        LOGGER.info("started embedded worker %d (pid %d)", index, proc.pid)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="embedded-workers", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # Workers are started (and restarted) from this thread only, and it ends only after
        # stop() has waited for them: their parent-death signal follows the thread that
        # started them (prctl(2)), so it must not end while they run.
        for i in range(self.count):
            self._spawn(i)
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None or self._stop.is_set():
                    continue
                self.procs[i] = None
                if not self.supervisor.part_restarted(f"embedded worker {i}", proc.returncode):
                    continue
                if not self._stop.wait(RESTART_DELAY):
                    self._spawn(i)
        self._stopped.wait()

    def stop(self) -> None:
        self._stop.set()
        try:
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            for proc in self.procs:
                if proc is None:
                    continue
                try:
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        finally:
            self._stopped.set()
