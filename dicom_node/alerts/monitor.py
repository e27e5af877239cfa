"""The alert monitor: looks at the state database and the disks every ``alerts.interval`` and
turns changes into webhook events.

Events (``event`` in the JSON body):

* ``destination-down`` / ``destination-recovered``: edge-triggered, once when a destination
  turns from up to down and once when it turns back (from its deliveries and probes:
  :func:`dicom_node.alerts.health.destination_health`), not once per failed attempt;
* ``job-failed``: a job reached ``failed`` (with its recorded reason);
* ``finding``: a job finished with at least one finding; each webhook may ask only for a
  finding at least ``min_finding_mm`` long;
* ``disk-low``: the spool's (or the SQLite database's) file system has less than
  ``alerts.disk_low_bytes`` free; once, and again only after it has recovered.

Bodies are patient-free by construction: they are built here from the node's own keys (job id,
study key, model name and version, destination name, sizes) and never from a DICOM header.

Runs in ``dicom-node serve`` (a component), next to the pipeline loop. Reading the database,
rather than hooking the worker processes that deliver, sees every worker on every machine and
keeps one state per destination. Several nodes sharing one PostgreSQL database each send the
events: configure webhooks on one of them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.alerts.health import destination_health, free_bytes, sqlite_path
from dicom_node.alerts.webhooks import WebhookSender
from dicom_node.background import BackgroundThread
from dicom_node.settings import Settings
from dicom_node.state import Database, Job, JobState, Study, utcnow

LOGGER = logging.getLogger(__name__)

FINISHED_LOOKBACK = timedelta(minutes=2)
"""Finished jobs are looked for this far behind the last look, so a job whose commit landed
late is still seen (once: the ids already seen are remembered for as long)."""

DISK_REARM = 1.1
"""``disk-low`` fires again only after free space rose above this multiple of the threshold."""


class AlertMonitor(BackgroundThread):
    """Component for ``dicom-node serve`` (``start``/``stop``); :meth:`check` is one look."""

    def __init__(
        self, settings: Settings, db: Database, sender: WebhookSender | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.db = db
        self.sender = sender or WebhookSender(settings.alerts)
        self._up: dict[str, bool] = {}
        self._disk_low: dict[str, bool] = {}
        self._since: datetime = utcnow()
        self._seen: dict[str, datetime] = {}

    thread_name = "alert-monitor"

    def start(self) -> None:
        self.sender.start()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.sender.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # the database may be away for a while; keep looking
                LOGGER.warning("alert check failed: %s: %s", type(exc).__name__, exc)
            self._stop.wait(self.settings.alerts.interval)

    def check(self) -> None:
        """One look: destinations, finished jobs, disks."""
        self._destinations()
        self._finished_jobs()
        self._disks()

    def _emit(self, event: str, **fields: Any) -> None:
        payload = {
            "event": event,
            "time": utcnow().isoformat(),
            "node": self.settings.node_name,
            **fields,
        }
        LOGGER.info("alert %s %s", event, {k: v for k, v in fields.items() if k != "findings"})
        self.sender.emit(event, payload)

    # -- destinations ---------------------------------------------------------------------------

    def _destinations(self) -> None:
        with self.db.session() as s:
            health = destination_health(s, self.settings.all_destinations())
        for name, up in health.items():
            # An unknown destination counts as up: one that already fails at start-up is told.
            was = self._up.get(name, True)
            self._up[name] = up
            if was and not up:
                self._emit("destination-down", destination=name)
            elif up and not was:
                self._emit("destination-recovered", destination=name)

    # -- finished jobs --------------------------------------------------------------------------

    def _finished_jobs(self) -> None:
        since = self._since - FINISHED_LOOKBACK
        newest = self._since
        states = (JobState.FAILED.value, JobState.DONE.value)
        with self.db.session() as s:
            rows = s.execute(
                select(
                    Job.id,
                    Job.state,
                    Job.model,
                    Job.model_version,
                    Job.reason,
                    Job.summary,
                    Job.finished_at,
                    Study.study_key,
                )
                .join(Study, Study.id == Job.study_id)
                .where(Job.state.in_(states), Job.finished_at >= since)
                .order_by(Job.finished_at)
            ).all()
        for job_id, state, model, version, reason, summary, finished, study_key in rows:
            if finished is None or self._seen.get(job_id) == finished:
                continue
            self._seen[job_id] = finished
            newest = max(newest, finished)
            common = {
                "job_id": job_id,
                "study_key": study_key,
                "model": model,
                "model_version": version,
            }
            if state == JobState.FAILED.value:
                self._emit("job-failed", **common, reason=reason)
            else:
                findings = _finding_sizes(summary or {})
                if findings:
                    self._emit(
                        "finding",
                        **common,
                        finding_count=len(findings),
                        largest_finding_mm=max(f["diameter_mm"] or 0.0 for f in findings),
                        findings=findings,
                    )
        self._since = newest
        horizon = newest - FINISHED_LOOKBACK
        self._seen = {k: v for k, v in self._seen.items() if v >= horizon}

    # -- disks ----------------------------------------------------------------------------------

    def _disks(self) -> None:
        paths: dict[str, Path] = {"spool": Path(self.settings.spool_dir)}
        db_file = sqlite_path(self.settings.resolved_database_url)
        if db_file is not None:
            paths["database"] = db_file
        limit = self.settings.alerts.disk_low_bytes
        for what, path in paths.items():
            free = free_bytes(path)
            if free is None:
                continue
            low = self._disk_low.get(what, False)
            if not low and free < limit:
                self._disk_low[what] = True
                self._emit("disk-low", disk=what, free_bytes=free, threshold_bytes=limit)
            elif low and free > limit * DISK_REARM:
                self._disk_low[what] = False


def _finding_sizes(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Size, kind and confidence of each finding of a job summary (no positions, nothing from a
    DICOM header)."""
    out = []
    for f in summary.get("findings") or []:
        if not isinstance(f, dict):
            continue
        diameter = f.get("diameter_mm")
        out.append(
            {
                "label": f.get("label"),
                "diameter_mm": float(diameter) if isinstance(diameter, int | float) else None,
                "volume_mm3": f.get("volume_mm3"),
                "confidence": f.get("confidence"),
            }
        )
    return out
