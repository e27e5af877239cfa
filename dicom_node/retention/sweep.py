"""One retention sweep: mark the rows, then remove the files (see :mod:`dicom_node.retention`)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from dicom_node import audit
from dicom_node.results_store import ResultStore, ResultStoreError
from dicom_node.retention.policy import (
    TERMINAL,
    Candidate,
    DiskState,
    delivered_everywhere,
    disk_or_none,
    disk_state,
    instance_candidates,
    result_candidates,
    results_on_spool_disk,
    state_class,
)
from dicom_node.settings import Settings
from dicom_node.spool import Spool
from dicom_node.state import Database, Delivery, DeliveryState, Instance, Job, Output, Study, utcnow

LOGGER = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep removed (or, dry, would remove): counts and bytes, nothing identifying."""

    dry_run: bool
    studies: int = 0
    instances: int = 0
    instance_bytes: int = 0
    jobs: int = 0
    results: int = 0
    result_bytes: int = 0
    by_age: int = 0
    """Candidates (studies + jobs) removed because they were past their age limit..."""
    by_pressure: int = 0
    """... and those removed early, for disk pressure."""
    pressure: bool = False
    """The spool's file system was over the high watermark when the sweep began."""
    relieved: bool = True
    """Not under pressure when the sweep ended (False: nothing more was allowed to go)."""
    used_percent_before: float | None = None
    used_percent_after: float | None = None
    free_bytes_before: int | None = None
    free_bytes_after: int | None = None
    errors: int = 0
    """Files that could not be removed (their rows are marked all the same: see _unlink)."""
    by_state: dict[str, int] = field(default_factory=dict)
    """Studies removed per class of their latest jobs (done, failed, skipped)."""

    @property
    def purged(self) -> bool:
        return bool(self.studies or self.jobs)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# -- the sweep ---------------------------------------------------------------------------------


def sweep(
    db: Database,
    settings: Settings,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    actor: str = "node",
) -> SweepReport:
    """One retention sweep: remove what is past its age, then, under disk pressure, what is
    allowed, oldest first, until the spool's file system is down to the low watermark.

    With ``dry_run`` nothing is removed or marked; the report says what would be. A sweep that
    removed something or met pressure is audited (counts only), as done by ``actor``."""
    now = now or utcnow()
    report = SweepReport(dry_run=dry_run)
    disk = disk_or_none(settings)
    if disk is not None:
        report.used_percent_before = round(disk.used_percent, 2)
        report.free_bytes_before = disk.free
        report.pressure = disk.under_pressure
    candidates = instance_candidates(db, settings, now)
    same_disk = results_on_spool_disk(settings)
    candidates += result_candidates(db, settings, now)
    candidates.sort(key=lambda c: c.since)

    spool = Spool(settings.spool_dir, fsync=False)
    store = ResultStore(settings.results_dir)
    freed_on_spool = 0  # what a dry run counts instead of looking at the disk again
    for candidate in candidates:
        if not candidate.due:
            continue
        if _purge(db, settings, spool, store, candidate, now, dry_run, report):
            report.by_age += 1
            if candidate.kind == "instances" or same_disk:
                freed_on_spool += candidate.bytes

    if disk is not None and report.pressure:
        state = _disk_after(settings, disk, dry_run, freed_on_spool)
        for candidate in candidates:
            if state.free >= state.stop_free:
                break
            if candidate.due or (candidate.kind == "results" and not same_disk):
                continue  # already handled, or freeing it would not help the spool
            if _purge(db, settings, spool, store, candidate, now, dry_run, report):
                report.by_pressure += 1
                freed_on_spool += candidate.bytes
                state = _disk_after(settings, disk, dry_run, freed_on_spool)
        report.relieved = not state.under_pressure

    after = _disk_after(settings, disk, dry_run, freed_on_spool) if disk is not None else None
    if after is not None:
        report.used_percent_after = round(after.used_percent, 2)
        report.free_bytes_after = after.free
        report.relieved = report.relieved and not after.under_pressure
    if not dry_run and (report.purged or report.pressure):
        _audit(db, report, actor)
    if report.pressure and not report.relieved:
        LOGGER.warning(
            "spool file system still above its high watermark after a retention sweep "
            "(%.1f%% used): nothing more may be removed (jobs not terminal or results not "
            "delivered)",
            report.used_percent_after or 0.0,
        )
    return report


def _disk_after(settings: Settings, before: DiskState, dry_run: bool, freed: int) -> DiskState:
    """The disk now; for a dry run, as it would be once ``freed`` bytes are gone."""
    if dry_run:
        return disk_state(settings, free=before.free + freed)
    return disk_or_none(settings) or before


def _purge(
    db: Database,
    settings: Settings,
    spool: Spool,
    store: ResultStore,
    candidate: Candidate,
    now: datetime,
    dry_run: bool,
    report: SweepReport,
) -> bool:
    """Remove one candidate's files; False when it is no longer allowed (checked again)."""
    if dry_run:
        _count(report, candidate, candidate.files, candidate.bytes, _dry_class(db, candidate))
        return True
    if candidate.kind == "instances":
        marked = _mark_instances(db, int(candidate.key), now)
        if marked is None:
            return False
        paths, size, klass, job_ids = marked
        for relative in paths:
            report.errors += _unlink(spool.path(relative))
        _mark_missing(db, spool, int(candidate.key), now)
        _forget_previews(settings.data_dir / "previews", job_ids)
    else:
        marked_results = _mark_results(db, str(candidate.key), now)
        if marked_results is None:
            return False
        paths, size = marked_results
        klass = ""
        for relative in paths:
            try:
                report.errors += _unlink(store.path(relative))
            except ResultStoreError:
                report.errors += 1
        with contextlib.suppress(OSError):
            (store.root / str(candidate.key)).rmdir()  # the job's folder, once empty
    _count(report, candidate, len(paths), size, klass)
    return True


def _count(report: SweepReport, candidate: Candidate, files: int, size: int, klass: str) -> None:
    if candidate.kind == "instances":
        report.studies += 1
        report.instances += files
        report.instance_bytes += size
        report.by_state[klass] = report.by_state.get(klass, 0) + 1
    else:
        report.jobs += 1
        report.results += files
        report.result_bytes += size


def _dry_class(db: Database, candidate: Candidate) -> str:
    if candidate.kind != "instances":
        return ""
    with db.session() as s:
        latest = s.scalar(select(func.max(Job.study_version)).where(Job.study_id == candidate.key))
        states = set(
            s.scalars(
                select(Job.state).where(Job.study_id == candidate.key, Job.study_version == latest)
            )
        )
    return state_class(states)


def _mark_instances(
    db: Database, study_id: int, now: datetime
) -> tuple[list[str], int, str, list[str]] | None:
    """Mark a study's kept instances purged, if it is still allowed; returns their spool paths,
    bytes, the study's retention class and its job ids. The study row is locked (PostgreSQL;
    SQLite's transactions are ``BEGIN IMMEDIATE``): an instance being indexed waits, and
    makes the study dirty again after this commits."""
    with db.session() as s:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None or study.dirty:
            return None
        jobs = s.execute(
            select(Job.id, Job.study_version, Job.state).where(Job.study_id == study_id)
        ).all()
        if not jobs or any(state not in TERMINAL for _, _, state in jobs):
            return None
        rows = s.execute(
            select(Instance.path, Instance.size).where(
                Instance.study_id == study_id, Instance.purged_at.is_(None)
            )
        ).all()
        if not rows:
            return None  # another sweep (dicom-node cleanup beside serve) got there first
        s.execute(
            update(Instance)
            .where(Instance.study_id == study_id, Instance.purged_at.is_(None))
            .values(purged_at=now)
        )
        latest = max(version for _, version, _ in jobs)
        klass = state_class({state for _, version, state in jobs if version == latest})
    # The files go after the commit: a crash in between leaves files whose rows say purged,
    # never rows that point at files already gone while the node thinks them there.
    return [p for p, _ in rows], sum(int(n) for _, n in rows), klass, [j for j, _, _ in jobs]


def _mark_missing(db: Database, spool: Spool, study_id: int, now: datetime) -> None:
    """Mark purged the study's instances said to be kept whose file is gone.

    A copy of an instance sent again between the commit that marked it and the removal of its
    file takes the file's place and clears the mark (duplicate action ``restored``), and the
    removal then takes the new copy: the row must say so, so that no job counts on the file.
    The study row is locked first, as the restoring copy's transaction locks it.
    """
    with db.session() as s:
        s.get(Study, study_id, with_for_update=True)
        rows = s.execute(
            select(Instance.id, Instance.path).where(
                Instance.study_id == study_id, Instance.purged_at.is_(None)
            )
        ).all()
        gone = [row_id for row_id, relative in rows if not spool.path(relative).exists()]
        if gone:
            s.execute(update(Instance).where(Instance.id.in_(gone)).values(purged_at=now))


def _mark_results(db: Database, job_id: str, now: datetime) -> tuple[list[str], int] | None:
    """Mark a job's kept result files purged, if still allowed; returns their paths, bytes."""
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.state not in TERMINAL:
            return None
        delivered = set(
            s.scalars(
                select(Delivery.destination).where(
                    Delivery.job_id == job_id, Delivery.state == DeliveryState.DONE.value
                )
            )
        )
        if not delivered_everywhere(job.destinations, delivered):
            return None
        rows = s.execute(
            select(Output.path, Output.size).where(
                Output.job_id == job_id, Output.purged_at.is_(None)
            )
        ).all()
        if not rows:
            return None
        s.execute(
            update(Output)
            .where(Output.job_id == job_id, Output.purged_at.is_(None))
            .values(purged_at=now)
        )
    return [p for p, _ in rows], sum(int(n) for _, n in rows)


def _unlink(path: Path) -> int:
    """Remove one file; returns 1 when it could not be (0 when removed or already gone).

    Spool directories are left in place even when empty: a receiver caches the directories it
    has made, and a late instance of the series must find its directory there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        LOGGER.error("retention: a file could not be removed (%s)", exc.strerror)
        return 1
    return 0


def _forget_previews(previews: Path, job_ids: list[str]) -> None:
    """Remove the cached preview images of a purged study's jobs (they show its pixels)."""
    if not previews.is_dir():
        return
    for job_id in job_ids:
        for cached in previews.glob(f"{job_id}-*.png"):
            _unlink(cached)


def _audit(db: Database, report: SweepReport, actor: str) -> None:
    audit.record(
        db,
        audit.RETENTION_SWEEP,
        actor=actor,
        outcome="success" if report.relieved else "warning",
        studies=report.studies,
        instances=report.instances,
        instance_bytes=report.instance_bytes,
        jobs=report.jobs,
        results=report.results,
        result_bytes=report.result_bytes,
        by_age=report.by_age,
        by_pressure=report.by_pressure,
        pressure=report.pressure,
        used_percent_after=report.used_percent_after,
        errors=report.errors,
    )
