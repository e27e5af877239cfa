"""The ``[[pull]]`` schedules of ``dicom-node serve``: each one a backfill every ``interval_s``
seconds over the last ``lookback_hours``, audited (``backfill-run``, actor ``pull:NAME``) and
counted on ``/metrics`` (``dicom_node_pull_runs_total``, ``dicom_node_pull_studies_total``)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from dicom_node import metrics
from dicom_node.backfill.query import DateWindow
from dicom_node.backfill.run import BackfillReport, run_backfill
from dicom_node.background import BackgroundThread
from dicom_node.settings import PullSettings, Settings
from dicom_node.state import Database

LOGGER = logging.getLogger(__name__)

FIRST_RUN_DELAY_S = 5.0
"""Seconds after start-up before the first run (the receivers are up by then)."""
IDLE_POLL_S = 1.0


def window_for(pull: PullSettings, now: datetime | None = None) -> DateWindow:
    """Study Dates from ``now - lookback_hours`` to today (local dates, as modalities write
    them)."""
    now = now or datetime.now()
    return DateWindow((now - timedelta(hours=pull.lookback_hours)).date(), now.date())


class PullScheduler(BackgroundThread):
    """Runs the enabled ``[[pull]]`` schedules one after the other in one thread."""

    thread_name = "pull"

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__()
        self.settings = settings
        self.db = db
        self.pulls = [p for p in settings.pull if p.enabled]

    def _run(self) -> None:
        start = time.monotonic() + FIRST_RUN_DELAY_S
        next_at = {p.name: start for p in self.pulls}
        while not self._stop.is_set():
            for pull in self.pulls:
                if self._stop.is_set():
                    return
                if time.monotonic() >= next_at[pull.name]:
                    self.run_once(pull)
                    next_at[pull.name] = time.monotonic() + pull.interval_s
            self._stop.wait(IDLE_POLL_S)

    def run_once(self, pull: PullSettings) -> BackfillReport | None:
        """One run of ``pull``; never raises (a failed run is logged, audited and counted)."""
        try:
            report = run_backfill(
                self.settings,
                self.db,
                source=pull.source,
                window=window_for(pull),
                modality=pull.modality,
                limit=pull.limit,
                actor=f"pull:{pull.name}",
                stop=self._stop.is_set,
            )
        except Exception as exc:  # the source is down, or a bug: the next run tries again
            from dicom_node.phi import describe_exception

            LOGGER.warning("pull %s: %s", pull.name, describe_exception(exc))
            metrics.observe_pull(pull.name, "failure", 0)
            return None
        pulled = len(report.pulled) - len(report.failed)
        metrics.observe_pull(pull.name, "success" if report.ok else "failure", pulled)
        return report
