"""Job state machine in the state database: claim with a lease, renew, transition, finish.

At-least-once delivery of Celery messages becomes exactly-once *effects* here:

* A worker may only run a job it has **claimed**: one conditional UPDATE that succeeds for a job
  that is waiting/queued, or whose previous holder's lease has expired. A second delivery of a
  job that runs elsewhere or is finished claims nothing and is dropped harmlessly.
* Each claim counts an attempt. A job whose attempts keep ending without a result (the worker was
  killed: OOM, segfault, SIGKILL) is failed with that reason once ``max_attempts`` is used up, so a
  poison study cannot loop forever (Redis gives no delivery count).
* The lease is renewed while the job runs; the reconciler re-dispatches a job whose lease
  expired (its worker died) or whose message got lost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, cast

from sqlalchemy import CursorResult, or_, select, update

from dicom_node.broker import DELIVER_TASK, DELIVERY_QUEUE, RUN_JOB_TASK
from dicom_node.phi import reason_text
from dicom_node.state import Database, Delivery, DeliveryState, Job, JobState, Outbox, Study, utcnow

_JOB_NAMESPACE = uuid.UUID("6d1f2b1e-8f0c-4e0f-9d7a-3a7c1f4b2e11")

ACTIVE_STATES = (JobState.RUNNING.value, JobState.DELIVERING.value)


def job_id_for(study_instance_uid: str, input_hash: str, rule: str, model: str) -> str:
    """Deterministic job id: the same study input, rule and model always give the same id."""
    return str(uuid.uuid5(_JOB_NAMESPACE, f"{study_instance_uid}|{input_hash}|{rule}|{model}"))


class ClaimOutcome(str, Enum):
    CLAIMED = "claimed"
    FINISHED = "finished"  # already terminal: drop the message
    BUSY = "busy"  # another live lease holds it: drop; the reconciler re-sends if it dies
    EXHAUSTED = "exhausted"  # attempts used up: failed now
    MISSING = "missing"


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    attempt: int = 0
    job_state: str | None = None


def claim(
    db: Database,
    job_id: str,
    owner: str,
    lease_seconds: float,
    *,
    states: tuple[str, ...] = (JobState.WAITING.value, JobState.QUEUED.value),
    next_state: JobState = JobState.RUNNING,
    count_attempt: bool = True,
) -> Claim:
    """Take a job under a lease. See the module docstring for the rules."""
    now = utcnow()
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            return Claim(ClaimOutcome.MISSING)
        if JobState(job.state).terminal:
            return Claim(ClaimOutcome.FINISHED, job.attempts, job.state)
        takeover = job.state in ACTIVE_STATES
        if takeover and job.lease_expires_at is not None and job.lease_expires_at > now:
            return Claim(ClaimOutcome.BUSY, job.attempts, job.state)
        if job.state not in states and not takeover:
            return Claim(ClaimOutcome.BUSY, job.attempts, job.state)
        resume_delivery = job.state == JobState.DELIVERING.value
        if count_attempt and not resume_delivery and job.attempts >= job.max_attempts:
            last = "its worker was lost (killed or crashed)" if takeover else "it kept failing"
            job.state = JobState.FAILED.value
            job.reason = f"gave up after {job.attempts} attempts; the last attempt ended without a result: {last}"
            job.finished_at = now
            job.updated_at = now
            job.lease_owner = None
            job.lease_expires_at = None
            return Claim(ClaimOutcome.EXHAUSTED, job.attempts, job.state)
        if count_attempt and not resume_delivery:
            job.attempts += 1
        job.state = (JobState.DELIVERING if resume_delivery else next_state).value
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        if job.started_at is None or not resume_delivery:
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


def holds(db: Database, job_id: str, owner: str) -> bool:
    with db.session() as s:
        job = s.get(Job, job_id)
        return job is not None and job.lease_owner == owner and job.state in ACTIVE_STATES


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
    db: Database, job_id: str, owner: str, state: JobState, reason: str | None = None, **values: Any
) -> bool:
    """Move a job we hold to a terminal state and release the lease."""
    now = utcnow()
    return update_job(
        db,
        job_id,
        owner,
        state=state.value,
        reason=reason_text(reason),
        finished_at=now,
        lease_owner=None,
        lease_expires_at=None,
        **values,
    )


def _hand_back(
    db: Database,
    job_id: str,
    owner: str,
    *,
    holding: tuple[str, ...],
    task: str,
    queue: str | None,
    due: datetime,
    **values: Any,
) -> bool:
    """Release our lease and leave an outbox record that wakes the job again at ``due``."""
    now = utcnow()
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.lease_owner != owner or job.state not in holding:
            return False
        for name, value in values.items():
            setattr(job, name, value)
        job.lease_owner = None
        job.lease_expires_at = None
        job.updated_at = now
        s.add(
            Outbox(
                job_id=job_id,
                task=task,
                queue=queue or job.queue,
                created_at=now,
                not_before=due,
                attempts=0,
            )
        )
        return True


def release_for_retry(db: Database, job_id: str, owner: str, reason: str, delay: float) -> bool:
    """Give a job back after a transient error: queued again with an outbox record due later."""
    return _hand_back(
        db,
        job_id,
        owner,
        holding=ACTIVE_STATES,
        task=RUN_JOB_TASK,
        queue=None,
        due=utcnow() + timedelta(seconds=delay),
        state=JobState.QUEUED.value,
        reason=reason_text(reason),
    )


def park_for_delivery(db: Database, job_id: str, owner: str, due: datetime) -> bool:
    """Release a delivering job until its next delivery attempt is due (no worker waits)."""
    return _hand_back(
        db,
        job_id,
        owner,
        holding=(JobState.DELIVERING.value,),
        task=DELIVER_TASK,
        queue=DELIVERY_QUEUE,
        due=due,
    )


def cancel(db: Database, job_id: str, reason: str = "cancelled by an operator") -> bool:
    """Cancel a job that has not finished (a running attempt notices at its next lease renewal)."""
    now = utcnow()
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or JobState(job.state).terminal:
            return False
        job.state = JobState.CANCELLED.value
        job.reason = reason
        job.finished_at = now
        job.updated_at = now
        job.lease_owner = None
        job.lease_expires_at = None
        s.query(Outbox).filter(Outbox.job_id == job_id).delete()
        return True


def retry(db: Database, job_id: str) -> bool:
    """Run a finished (failed/cancelled/done) job again from the start, with fresh attempts."""
    now = utcnow()
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or not JobState(job.state).terminal or job.model == "-":
            return False
        job.state = JobState.WAITING.value
        job.reason = None
        job.attempts = 0
        job.finished_at = None
        job.lease_owner = None
        job.lease_expires_at = None
        job.updated_at = now
        # Deliver again too (the PACS may have lost the objects); resends are harmless because
        # the outputs keep their UIDs and bytes.
        for d in job.deliveries:
            d.state = DeliveryState.PENDING.value
            d.attempts = 0
            d.next_attempt_at = None
            d.last_error = None
        s.add(Outbox(job_id=job_id, task=RUN_JOB_TASK, queue=job.queue, created_at=now, attempts=0))
        return True


def study_key_of(db: Database, job_id: str) -> str | None:
    with db.session() as s:
        return s.scalar(
            select(Study.study_key).join(Job, Job.study_id == Study.id).where(Job.id == job_id)
        )


def pending_deliveries(db: Database, job_id: str) -> list[Delivery]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Delivery).where(
                    Delivery.job_id == job_id,
                    or_(
                        Delivery.state == DeliveryState.PENDING.value,
                        Delivery.state == DeliveryState.RETRY.value,
                    ),
                )
            )
        )
