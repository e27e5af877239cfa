"""What the node's health is now, read from the state database and the disks.

Shared by ``/metrics`` (:mod:`dicom_node.metrics`, at scrape time) and the alert monitor
(:mod:`dicom_node.alerts.monitor`, every ``alerts.interval``): the gauge an alert rule watches
and the webhook an operator receives are computed by the same functions.

The state database is the source of truth: deliveries are made by worker processes, possibly on
other machines, and each records its attempts there; nothing here depends on being in the
process that made them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from dicom_node.state import Delivery, DeliveryState, Job, JobState, ProbeResult

PRIORITIES: tuple[str, ...] = ("stat", "routine", "research")
"""Route priorities (``priority = "stat" | "routine" | "research"``); a job without one is
``routine``."""

DEFAULT_PRIORITY = "routine"

WAITING_STATES: tuple[str, ...] = (JobState.WAITING.value, JobState.QUEUED.value)
"""A job waiting for a worker: not yet dispatched, or dispatched and not started."""


def free_bytes(path: Path) -> int | None:
    """Free bytes (for an unprivileged writer) on the file system holding ``path``, or ``None``
    when no part of the path exists."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return int(shutil.disk_usage(candidate).free)
            except OSError:
                return None
    return None


def sqlite_path(database_url: str) -> Path | None:
    """The file of an SQLite state database; ``None`` for an in-memory one or another backend
    (PostgreSQL's disk is the database server's business, not the node's)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def oldest_waiting_by_priority(s: Session, now: datetime) -> dict[str, float]:
    """Age (s) of the oldest job waiting for a worker, per priority; every priority is listed
    (0 when none waits), so alert rules and dashboards always find the series.

    Jobs carry no priority yet: until a ``priority`` column exists they all count as
    :data:`DEFAULT_PRIORITY`. This is the one place that changes when it does.
    """
    column = getattr(Job, "priority", None)
    ages = dict.fromkeys(PRIORITIES, 0.0)
    if column is None:
        first = s.scalar(select(func.min(Job.created_at)).where(Job.state.in_(WAITING_STATES)))
        rows: Iterable[tuple[Any, Any]] = [(DEFAULT_PRIORITY, first)]
    else:
        rows = s.execute(
            select(column, func.min(Job.created_at))
            .where(Job.state.in_(WAITING_STATES))
            .group_by(column)
        ).all()
    for priority, first in rows:
        if first is not None:
            key = str(priority or DEFAULT_PRIORITY)
            ages[key] = max(ages.get(key, 0.0), (now - first).total_seconds(), 0.0)
    return ages


def destination_health(s: Session, names: Iterable[str]) -> dict[str, bool]:
    """Whether each destination is up, from its deliveries and its probes.

    A destination is *down* when

    * its latest probe (:mod:`dicom_node.delivery.probe`, where probes run) failed, or
    * a delivery to it waits to retry after a failure newer than its last successful delivery,
      or
    * a delivery to it was given up (failed) after its last successful delivery and no probe has
      succeeded since.

    A successful probe does not clear a delivery that is still being retried (C-ECHO may answer
    while STOW-RS fails): the state changes when the retry succeeds, so it does not flap with
    each probe. The time of a failed attempt is when its job was handed back after it
    (``jobs.updated_at``); of a success, ``deliveries.delivered_at``. A destination with nothing
    on record is up. ``names`` are the configured destinations; others found in the database
    are included too.
    """
    ok = _by_destination(
        s,
        select(Delivery.destination, func.max(Delivery.delivered_at))
        .where(Delivery.state == DeliveryState.DONE.value)
        .group_by(Delivery.destination),
    )
    failed_at = {}
    for state in (DeliveryState.RETRY, DeliveryState.FAILED):
        failed_at[state] = _by_destination(
            s,
            select(Delivery.destination, func.max(Job.updated_at))
            .join(Job, Job.id == Delivery.job_id)
            .where(Delivery.state == state.value, Delivery.attempts > 0)
            .group_by(Delivery.destination),
        )
    probe_ok, probe_bad = (
        _by_destination(
            s,
            select(ProbeResult.destination, func.max(ProbeResult.at))
            .where(ProbeResult.ok == flag)
            .group_by(ProbeResult.destination),
        )
        for flag in (True, False)
    )
    out: dict[str, bool] = {}
    known = {*names, *ok, *failed_at[DeliveryState.RETRY], *failed_at[DeliveryState.FAILED]}
    for name in sorted(known | set(probe_ok) | set(probe_bad)):
        delivered = ok.get(name)
        probed_ok = probe_ok.get(name)
        down = (
            _after(probe_bad.get(name), probed_ok)
            or _after(failed_at[DeliveryState.RETRY].get(name), delivered)
            or _after(failed_at[DeliveryState.FAILED].get(name), _latest(delivered, probed_ok))
        )
        out[name] = not down
    return out


def _by_destination(s: Session, query: Any) -> dict[str, datetime]:
    return {name: at for name, at in s.execute(query).all() if at is not None}


def _after(event: datetime | None, since: datetime | None) -> bool:
    """``event`` happened, and after ``since`` (if that happened at all)."""
    return event is not None and (since is None or event > since)


def _latest(*times: datetime | None) -> datetime | None:
    return max((t for t in times if t is not None), default=None)
