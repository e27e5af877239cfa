"""Retention in ``dicom-node serve`` (:class:`RetentionSweeper`) and on ``/metrics``."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select

from dicom_node.background import BackgroundThread
from dicom_node.retention.policy import disk_or_none
from dicom_node.retention.sweep import SweepReport, sweep
from dicom_node.settings import Settings
from dicom_node.state import Database, Instance, Output

LOGGER = logging.getLogger(__name__)

PRESSURE_CHECK_S = 10.0
"""Seconds between two looks at the spool's free space in ``serve`` (one ``statvfs``): a disk
filling between two full sweeps is swept as soon as it crosses the high watermark."""


# -- metrics -------------------------------------------------------------------------------------


def metric_families(db: Database, prefix: str) -> Iterator[Any]:
    """Gauges and counters for ``/metrics``: bytes kept in the spool and the result store, and
    what retention removed (counted from the ``purged_at`` rows, so they survive restarts)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    with db.session() as s:
        instances = s.execute(
            select(
                Instance.purged_at.is_(None),
                func.count(),
                func.coalesce(func.sum(Instance.size), 0),
            ).group_by(Instance.purged_at.is_(None))
        ).all()
        outputs = s.execute(
            select(
                Output.purged_at.is_(None), func.count(), func.coalesce(func.sum(Output.size), 0)
            ).group_by(Output.purged_at.is_(None))
        ).all()
    kept = {"instances": 0, "results": 0}
    purged_n = {"instances": 0, "results": 0}
    purged_b = {"instances": 0, "results": 0}
    for kind, rows in (("instances", instances), ("results", outputs)):
        for on_disk, n, b in rows:
            if on_disk:
                kept[kind] = int(b)
            else:
                purged_n[kind], purged_b[kind] = int(n), int(b)
    yield GaugeMetricFamily(
        f"{prefix}_spool_bytes",
        "Bytes of received instances kept in the spool (as indexed).",
        value=float(kept["instances"]),
    )
    yield GaugeMetricFamily(
        f"{prefix}_results_bytes",
        "Bytes of result files kept in the result store (as recorded).",
        value=float(kept["results"]),
    )
    items = CounterMetricFamily(
        f"{prefix}_purged_items",
        "Files removed by retention: spool instances or result files.",
        labels=["kind"],
    )
    size = CounterMetricFamily(
        f"{prefix}_purged_bytes", "Bytes removed by retention.", labels=["kind"]
    )
    for kind in ("instances", "results"):
        items.add_metric([kind], float(purged_n[kind]))
        size.add_metric([kind], float(purged_b[kind]))
    yield items
    yield size


# -- the background sweep ----------------------------------------------------------------------


class RetentionSweeper(BackgroundThread):
    """Component of ``dicom-node serve``: a sweep at start, every ``retention.interval_s``
    seconds, and as soon as the spool's file system crosses the high watermark (looked at every
    :data:`PRESSURE_CHECK_S` seconds), in its own thread."""

    thread_name = "retention"
    join_timeout = 30.0

    def __init__(self, settings: Settings, db: Database) -> None:
        super().__init__()
        self.settings = settings
        self.db = db

    def run_once(self) -> SweepReport:
        report = sweep(self.db, self.settings)
        if report.purged:
            LOGGER.info(
                "retention: %d studies (%d instances, %d bytes) and %d jobs' results "
                "(%d files, %d bytes) removed",
                report.studies,
                report.instances,
                report.instance_bytes,
                report.jobs,
                report.results,
                report.result_bytes,
            )
        return report

    def _run(self) -> None:
        interval = self.settings.retention.interval_s
        next_sweep = time.monotonic()
        # After a sweep under pressure that could remove nothing, the next look for pressure
        # waits (doubling up to the interval): until a job ends or a delivery succeeds there is
        # nothing new to remove, and each such sweep is an audit record.
        stuck_wait = 0.0
        pressure_after = 0.0
        while True:
            now = time.monotonic()
            disk = disk_or_none(self.settings)
            pressed = disk is not None and disk.under_pressure and now >= pressure_after
            if now >= next_sweep or pressed:
                try:
                    report = self.run_once()
                except Exception:
                    LOGGER.exception("retention sweep failed; trying again next round")
                else:
                    if report.pressure and not report.relieved and not report.purged:
                        stuck_wait = min(max(2 * stuck_wait, 60.0), max(interval, 60.0))
                        pressure_after = time.monotonic() + stuck_wait
                    else:
                        stuck_wait = pressure_after = 0.0
                next_sweep = time.monotonic() + interval
            if self._stop.wait(min(PRESSURE_CHECK_S, interval)):
                return
