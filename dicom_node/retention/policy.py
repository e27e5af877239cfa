"""What retention may remove, and how full the spool's file system is.

A study's spool files may go once its jobs are all terminal and it has no instance a job has
not seen; a job's result files once it is terminal and delivered to every destination it names.
How long each is kept by age, and the watermarks, are the ``[retention]`` settings
(:class:`~dicom_node.settings.RetentionSettings`). Nothing here removes anything:
:mod:`dicom_node.retention.sweep` does, checking the same rules again under a lock.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select

from dicom_node.settings import Settings
from dicom_node.state import (
    Database,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Output,
    Study,
)
from dicom_node.state.models import TERMINAL_STATES

LOGGER = logging.getLogger(__name__)

TERMINAL = tuple(s.value for s in TERMINAL_STATES)
"""The terminal job states' values (as stored in ``jobs.state``)."""


@dataclass(frozen=True)
class DiskState:
    """The spool's file system, and the free space the watermarks stand for."""

    capacity: int
    """Used + free bytes (what ``df`` counts; blocks reserved for root left out)."""
    free: int
    start_free: int
    """A sweep under pressure starts below this many free bytes..."""
    stop_free: int
    """... and goes on until this many are free (or nothing more is allowed)."""

    @property
    def used_percent(self) -> float:
        return 100.0 * (self.capacity - self.free) / self.capacity if self.capacity else 0.0

    @property
    def under_pressure(self) -> bool:
        return self.free < self.start_free


def disk_state(settings: Settings, free: int | None = None) -> DiskState:
    """The spool file system's state, with the watermarks turned into free bytes.

    Raises ``OSError`` when the spool cannot be looked at."""
    usage = shutil.disk_usage(settings.spool_dir)
    capacity = usage.used + usage.free
    r = settings.retention
    floor = settings.scp.min_free_bytes
    start = max(capacity * (100.0 - r.high_watermark_percent) / 100.0, floor + r.floor_margin_bytes)
    stop = max(
        capacity * (100.0 - r.low_watermark_percent) / 100.0, floor + 2 * r.floor_margin_bytes
    )
    return DiskState(
        capacity=capacity,
        free=usage.free if free is None else free,
        start_free=int(start),
        stop_free=int(max(start, stop)),
    )


@dataclass(frozen=True)
class Candidate:
    """Files one sweep may remove: a study's spool files or a job's result files."""

    kind: Literal["instances", "results"]
    key: int | str
    """Study row id (instances) or job id (results); never shown."""
    since: datetime
    """What age is counted from: the last job's end (or the study's last arrival)."""
    due: bool
    """Past its age limit; otherwise removed only under disk pressure."""
    files: int
    bytes: int


# -- what may go -------------------------------------------------------------------------------


def state_class(states: set[str]) -> str:
    """The retention class of a study from its latest jobs' states."""
    if JobState.FAILED.value in states:
        return "failed"
    if JobState.DONE.value in states:
        return "done"
    return "skipped"


def instance_candidates(db: Database, settings: Settings, now: datetime) -> list[Candidate]:
    """Studies whose spool files may be removed (jobs all terminal, nothing unseen), with
    whether each is past its age limit."""
    r = settings.retention
    days = {
        "done": r.instances_days_done,
        "failed": r.instances_days_failed,
        "skipped": r.instances_days_skipped,
    }
    kept = select(Instance.study_id).where(Instance.purged_at.is_(None)).distinct()
    with db.session() as s:
        on_disk = {
            sid: (int(n), int(b or 0))
            for sid, n, b in s.execute(
                select(Instance.study_id, func.count(), func.sum(Instance.size))
                .where(Instance.purged_at.is_(None))
                .group_by(Instance.study_id)
            ).all()
        }
        if not on_disk:
            return []
        studies = dict(
            s.execute(
                select(Study.id, Study.last_received_at).where(
                    Study.dirty.is_(False), Study.id.in_(kept)
                )
            ).all()
        )
        jobs = s.execute(
            select(
                Job.study_id,
                Job.study_version,
                Job.state,
                func.coalesce(Job.finished_at, Job.updated_at),
            ).where(Job.study_id.in_(kept))
        ).all()
    per_study: dict[int, list[tuple[int, str, datetime]]] = {}
    for sid, version, state, ended in jobs:
        if sid in studies:
            per_study.setdefault(sid, []).append((version, state, ended))
    out = []
    for sid, rows in per_study.items():
        if any(state not in TERMINAL for _, state, _ in rows):
            continue  # a job still needs (or may need again) the files
        latest = max(version for version, _, _ in rows)
        klass = state_class({state for version, state, _ in rows if version == latest})
        since = max([studies[sid], *(ended for _, _, ended in rows)])
        limit = days[klass]
        due = bool(limit) and now - since >= timedelta(days=limit)
        files, size = on_disk[sid]
        out.append(Candidate("instances", sid, since, due, files, size))
    return out


def result_candidates(db: Database, settings: Settings, now: datetime) -> list[Candidate]:
    """Terminal jobs whose result files may be removed: delivered to every destination."""
    limit = settings.retention.results_days
    with db.session() as s:
        on_disk = {
            jid: (int(n), int(b or 0))
            for jid, n, b in s.execute(
                select(Output.job_id, func.count(), func.sum(Output.size))
                .where(Output.purged_at.is_(None))
                .group_by(Output.job_id)
            ).all()
        }
        if not on_disk:
            return []
        kept = select(Output.job_id).where(Output.purged_at.is_(None)).distinct()
        jobs = s.execute(
            select(
                Job.id, Job.state, Job.destinations, func.coalesce(Job.finished_at, Job.updated_at)
            ).where(Job.state.in_(TERMINAL), Job.id.in_(kept))
        ).all()
        delivered: dict[str, set[str]] = {}
        for jid, destination in s.execute(
            select(Delivery.job_id, Delivery.destination).where(
                Delivery.state == DeliveryState.DONE.value, Delivery.job_id.in_(kept)
            )
        ).all():
            delivered.setdefault(jid, set()).add(destination)
    out = []
    for jid, _state, destinations, ended in jobs:
        if jid not in on_disk or not delivered_everywhere(destinations, delivered.get(jid)):
            continue
        due = bool(limit) and now - ended >= timedelta(days=limit)
        files, size = on_disk[jid]
        out.append(Candidate("results", jid, ended, due, files, size))
    return out


def delivered_everywhere(destinations: list[Any] | None, delivered: set[str] | None) -> bool:
    return set(destinations or ()) <= (delivered or set())


def disk_or_none(settings: Settings) -> DiskState | None:
    try:
        return disk_state(settings)
    except OSError as exc:
        LOGGER.warning("retention: spool file system unavailable (%s)", exc.strerror)
        return None


def results_on_spool_disk(settings: Settings) -> bool:
    """Whether removing result files frees space on the spool's file system."""
    try:
        return os.stat(settings.results_dir).st_dev == os.stat(settings.spool_dir).st_dev
    except OSError:
        return False
