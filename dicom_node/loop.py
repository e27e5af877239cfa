"""The node's background loop: completion, dispatch and reconciliation, in one thread.

Each step reads and writes only the state database (and the broker, for dispatch), so several
nodes sharing a PostgreSQL database may run it at once: completion re-checks the study under a
row lock, job ids are deterministic, and duplicate messages are harmless.
"""

from __future__ import annotations

import logging
import threading
import time

from dicom_node.broker import make_celery
from dicom_node.completion import complete_due_studies
from dicom_node.dispatch import Dispatcher
from dicom_node.reconcile import reconcile
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database

LOGGER = logging.getLogger(__name__)

TICK_SECONDS = 0.25
TEMP_SWEEP_INTERVAL = 600.0
TEMP_MAX_AGE = 3600.0
"""Temporary files older than this are leftovers of aborted transfers (no transfer takes an hour)."""


class PipelineLoop:
    """Component for ``dicom-node serve`` (``start``/``stop``)."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.app = make_celery(settings, name="dicom_node.edge")
        self.dispatcher = Dispatcher(db, self.app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick: float = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pipeline-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def tick(self) -> None:
        """One round of every step (also used by tests)."""
        complete_due_studies(self.db, self.settings)
        self.dispatcher.run_once()

    def _run(self) -> None:
        next_reconcile = 0.0
        next_sweep = time.monotonic() + TEMP_SWEEP_INTERVAL
        spool = Spool(self.settings.spool_dir, fsync=False)
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if now >= next_reconcile:
                    reconcile(self.db, self.settings)
                    next_reconcile = now + self.settings.worker.reconcile_interval
                self.tick()
                if now >= next_sweep:
                    spool.sweep_temp(older_than=TEMP_MAX_AGE)
                    next_sweep = now + TEMP_SWEEP_INTERVAL
                self.last_tick = time.time()
            except Exception:
                LOGGER.exception("background loop step failed; retrying")
                self._stop.wait(2.0)
            self._stop.wait(TICK_SECONDS)
