"""Leases: a job is run, or delivered, only by the worker that claimed it.

At-least-once delivery of Celery messages becomes exactly-once *effects* here:

* A worker may only work on a job it has **claimed**: one conditional update that succeeds for a
  job that is free in the phase asked for (waiting/queued to run; parked to deliver) or whose
  previous holder's lease has expired. A second delivery of a message for a job that runs
  elsewhere or is finished claims nothing and is dropped harmlessly.
* Each claim to *run* counts an attempt. A job whose attempts keep ending without a result (the
  worker was killed: OOM, segfault, SIGKILL) is failed with that reason once ``max_attempts`` is
  used up, so a poison study cannot loop forever (Redis gives no delivery count).
* The lease is renewed while the job runs (:class:`Lease`); every write a holder makes
  (:func:`update_job` here, outputs, deliveries and timings in :mod:`dicom_node.jobs.records`)
  checks in the same transaction that it still holds the lease, so a worker presumed dead that
  wakes up again changes nothing.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from dicom_node.phi import reason_text
from dicom_node.state import Database, Job, JobState, utcnow

LOGGER = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.RUNNING.value, JobState.DELIVERING.value)
"""States in which a job is held under a lease."""

_FREE_TO_RUN = (JobState.WAITING.value, JobState.QUEUED.value)


class LeaseLost(Exception):
    """Our lease was taken over (we were too slow or presumed dead): stop without side effects."""


class ClaimOutcome(str, Enum):
    CLAIMED = "claimed"
    FINISHED = "finished"  # already terminal: drop the message
    BUSY = "busy"  # held by a live lease, or in another phase: drop; the reconciler re-sends
    EXHAUSTED = "exhausted"  # attempts used up: failed now
    MISSING = "missing"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempt: int = 0
    job_state: str | None = None


def claim(
    db: Database, job_id: str, owner: str, lease_seconds: float, *, delivery: bool = False
) -> Claim:
    """Take a job under a lease, to run its model or (``delivery=True``) to deliver its results.

    To run: a waiting/queued job, or a running one whose lease expired. To deliver: a job parked
    in ``delivering`` (no holder), or a delivering one whose lease expired. A job in the other
    phase is ``BUSY`` for this claim: a model worker never delivers and a delivery worker never
    runs a model (they may be on different machines, see ``docs/deployment.md``).
    """
    now = utcnow()
    phase_state = JobState.DELIVERING.value if delivery else JobState.RUNNING.value
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            return Claim(ClaimOutcome.MISSING)
        if JobState(job.state).terminal:
            return Claim(ClaimOutcome.FINISHED, job.attempts, job.state)
        held = job.lease_owner is not None
        expired = job.lease_expires_at is not None and job.lease_expires_at <= now
        if job.state == phase_state:
            free = not held or expired
        else:
            free = not delivery and job.state in _FREE_TO_RUN
        if not free:
            return Claim(ClaimOutcome.BUSY, job.attempts, job.state)
        if not delivery:
            if job.attempts >= job.max_attempts:
                last = "its worker was lost (killed or crashed)" if held else "it kept failing"
                job.state = JobState.FAILED.value
                job.reason = (
                    f"gave up after {job.attempts} attempts; the last attempt ended without a "
                    f"result: {last}"
                )
                job.finished_at = now
                job.updated_at = now
                job.lease_owner = None
                job.lease_expires_at = None
                return Claim(ClaimOutcome.EXHAUSTED, job.attempts, job.state)
            job.attempts += 1
            job.started_at = now
        job.state = phase_state
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        if job.started_at is None:
            job.started_at = now
        job.updated_at = now
        return Claim(ClaimOutcome.CLAIMED, job.attempts, job.state)


def renew(db: Database, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend our lease; False when we no longer hold the job (someone took it over)."""
    now = utcnow()
    with db.session() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state.in_(ACTIVE_STATES))
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        )
        return bool(cast(CursorResult[Any], result).rowcount)


def held_job(
    s: Session, job_id: str, owner: str, states: tuple[str, ...] = ACTIVE_STATES
) -> Job | None:
    """The job row, locked for this transaction, if ``owner`` holds its lease in ``states``.

    Every write a lease holder makes goes through this check in the same transaction as the
    write itself (``FOR UPDATE`` on PostgreSQL; SQLite transactions start ``IMMEDIATE``).
    """
    job = s.get(Job, job_id, with_for_update=True)
    if job is None or job.lease_owner != owner or job.state not in states:
        return None
    return job


def holds(
    db: Database, job_id: str, owner: str, states: tuple[str, ...] = ACTIVE_STATES
) -> bool | None:
    """Whether ``owner`` holds the job's lease in one of ``states``; ``None`` for no such job."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        return job.lease_owner == owner and job.state in states


def update_job(db: Database, job_id: str, owner: str, **values: Any) -> bool:
    """Change fields of a job we hold; False when we no longer hold it."""
    values.setdefault("updated_at", utcnow())
    with db.session() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state.in_(ACTIVE_STATES))
            .values(**values)
        )
        return bool(cast(CursorResult[Any], result).rowcount)


def finish(
    db: Database,
    job_id: str,
    owner: str,
    state: JobState,
    reason: str | None = None,
    *,
    timings: dict[str, float] | None = None,
) -> bool:
    """Move a job we hold to a terminal state, merge ``timings`` into its stage times and release
    the lease, in one transaction. False when we no longer hold it."""
    now = utcnow()
    with db.session() as s:
        job = held_job(s, job_id, owner)
        if job is None:
            return False
        if timings:
            job.timings = {**(job.timings or {}), **timings}
        job.state = state.value
        job.reason = reason_text(reason)
        job.finished_at = now
        job.updated_at = now
        job.lease_owner = None
        job.lease_expires_at = None
        return True


class Lease:
    """Renews a claimed job's lease every third of its length while the job is worked on.

    ``check()`` raises :class:`LeaseLost` once a renewal found the job taken over; the writes in
    :mod:`dicom_node.jobs.records` refuse on their own, so ``check()`` only saves wasted work.
    """

    def __init__(self, db: Database, job_id: str, owner: str, lease_seconds: float) -> None:
        self.db = db
        self.job_id = job_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                if not renew(self.db, self.job_id, self.owner, self.lease_seconds):
                    self.lost.set()
                    return
            except Exception:
                LOGGER.warning("lease renewal failed (database unreachable?)")

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost()
