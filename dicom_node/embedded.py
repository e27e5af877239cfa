"""Worker processes started by ``dicom-node serve`` itself (the single-machine setup).

They are ordinary ``dicom-node worker`` processes (real Celery workers), started with the same
environment and configuration file as the node, restarted if they die, stopped on shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from dicom_node.settings import Settings

LOGGER = logging.getLogger(__name__)

RESTART_DELAY = 5.0


class EmbeddedWorkers:
    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.settings = settings
        self.count = settings.embedded_worker_count
        self.config_path = config_path or os.environ.get("DICOM_NODE_CONFIG")
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _command(self, index: int) -> list[str]:
        cmd = [sys.executable, "-m", "dicom_node"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        queues = ",".join(sorted({*self.settings.worker.queues, "delivery"}))
        return [*cmd, "worker", "--queues", queues, "--name", f"embedded{index}"]

    def _spawn(self, index: int) -> None:
        self.procs[index] = subprocess.Popen(self._command(index), start_new_session=True)
        LOGGER.info("started embedded worker %d (pid %d)", index, self.procs[index].pid)  # type: ignore[union-attr]

    def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)
        self._thread = threading.Thread(target=self._watch, name="embedded-workers", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self._stop.is_set():
                    LOGGER.warning(
                        "embedded worker %d exited with %s; restarting", i, proc.returncode
                    )
                    time.sleep(RESTART_DELAY)
                    if not self._stop.is_set():
                        self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
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
