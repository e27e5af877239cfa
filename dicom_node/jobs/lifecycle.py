"""A job's life outside a worker: created, handed back for a retry or a delivery, cancelled, run
again. Every change that needs a Celery message writes its outbox record in the same transaction
(:mod:`dicom_node.dispatch` sends it), so a crash never leaves a job waiting for a message that
was never sent.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.broker import DELIVER_TASK, DELIVERY_QUEUE, RUN_JOB_TASK
from dicom_node.jobs.lease import ACTIVE_STATES, held_job
from dicom_node.phi import reason_text
from dicom_node.state import Database, DeliveryState, Job, JobState, Outbox, Study, utcnow

_JOB_NAMESPACE = uuid.UUID("6d1f2b1e-8f0c-4e0f-9d7a-3a7c1f4b2e11")


def job_id_for(
    study_instance_uid: str, input_hash: str, rule: str, model: str, generation: int = 0
) -> str:
    """Deterministic job id: the same study input, rule, model and generation always give the
    same id. Generation 0 (the job completion makes) adds nothing to the name, so its ids are
    those of the jobs made before re-runs existed."""
    name = f"{study_instance_uid}|{input_hash}|{rule}|{model}"
    if generation:
        name += f"|{generation}"
    return str(uuid.uuid5(_JOB_NAMESPACE, name))


@dataclass(frozen=True)
class JobSpec:
    """What routing decided for one version of a study's input set."""

    study_id: int
    study_instance_uid: str
    study_version: int
    input_hash: str
    input_count: int
    rule: str
    model: str
    queue: str
    max_attempts: int
    series_uids: list[str] = field(default_factory=list)
    destinations: list[str] = field(default_factory=list)
    supersedes_id: str | None = None
    priority: str = "routine"
    generation: int = 0
    """0 when the study completed; one more for each re-run of this input set, rule and model."""

    @property
    def job_id(self) -> str:
        return job_id_for(
            self.study_instance_uid, self.input_hash, self.rule, self.model, self.generation
        )


def create_job(
    s: Session, spec: JobSpec, now: datetime, *, skipped_reason: str | None = None
) -> str | None:
    """Add the job of ``spec`` in the caller's transaction, with its run message in the outbox,
    or already ``skipped`` with ``skipped_reason`` (no message). ``None`` when this exact input
    set, rule, model and generation already has a job (an identical resend creates nothing)."""
    job_id = spec.job_id
    if s.get(Job, job_id) is not None:
        return None
    skipped = skipped_reason is not None
    s.add(
        Job(
            id=job_id,
            study_id=spec.study_id,
            study_version=spec.study_version,
            rule=spec.rule,
            model=spec.model,
            queue=spec.queue,
            state=(JobState.SKIPPED if skipped else JobState.WAITING).value,
            reason=reason_text(skipped_reason) if skipped else None,
            input_hash=spec.input_hash,
            input_count=spec.input_count,
            series_uids=list(spec.series_uids),
            destinations=list(spec.destinations),
            attempts=0,
            max_attempts=spec.max_attempts,
            created_at=now,
            finished_at=now if skipped else None,
            updated_at=now,
            supersedes_id=spec.supersedes_id,
            priority=spec.priority,
            generation=spec.generation,
            timings={},
            summary={},
        )
    )
    if not skipped:
        s.flush()  # the outbox row references the job
        s.add(
            Outbox(job_id=job_id, task=RUN_JOB_TASK, queue=spec.queue, created_at=now, attempts=0)
        )
    return job_id


def _hand_back(
    db: Database,
    job_id: str,
    owner: str,
    *,
    holding: tuple[str, ...],
    task: str,
    queue: str | None,
    due: datetime,
    timings: dict[str, float] | None = None,
    **values: Any,
) -> bool:
    """Release our lease and leave an outbox record that wakes the job again at ``due``."""
    now = utcnow()
    with db.session() as s:
        job = held_job(s, job_id, owner, holding)
        if job is None:
            return False
        for name, value in values.items():
            setattr(job, name, value)
        if timings:
            job.timings = {**(job.timings or {}), **timings}
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


def release_for_retry(
    db: Database,
    job_id: str,
    owner: str,
    reason: str,
    delay: float,
    *,
    timings: dict[str, float] | None = None,
) -> bool:
    """Give a job back after a transient error: queued again with an outbox record due later."""
    return _hand_back(
        db,
        job_id,
        owner,
        holding=ACTIVE_STATES,
        task=RUN_JOB_TASK,
        queue=None,
        due=utcnow() + timedelta(seconds=delay),
        timings=timings,
        state=JobState.QUEUED.value,
        reason=reason_text(reason),
    )


def park_for_delivery(
    db: Database, job_id: str, owner: str, due: datetime, *, timings: dict[str, float] | None = None
) -> bool:
    """Release a delivering job until its next delivery attempt is due (no worker waits)."""
    return _hand_back(
        db,
        job_id,
        owner,
        holding=(JobState.DELIVERING.value,),
        task=DELIVER_TASK,
        queue=DELIVERY_QUEUE,
        due=due,
        timings=timings,
    )


def rerun_for_missing_results(db: Database, job_id: str, owner: str, reason: str) -> bool:
    """A delivering job whose stored results are gone: run the model again (its outputs come back
    byte-identical, their UIDs being derived from the study, the input set and the model); the
    deliveries keep their state and attempts. The run counts an attempt, so this cannot loop."""
    return _hand_back(
        db,
        job_id,
        owner,
        holding=(JobState.DELIVERING.value,),
        task=RUN_JOB_TASK,
        queue=None,
        due=utcnow(),
        state=JobState.QUEUED.value,
        reason=reason_text(reason),
    )


def cancel(db: Database, job_id: str, reason: str = "cancelled by an operator") -> bool:
    """Cancel a job that has not finished (a running attempt notices at its next lease renewal)."""
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or JobState(job.state).terminal:
            return False
        _cancel_row(s, job, reason, utcnow())
        return True


SUPERSEDED_UNFINISHED = "superseded by a newer input set of the study before it had results"
"""Reason of a job cancelled because a late instance started the study's next version."""

_NO_RESULTS_YET = frozenset({JobState.WAITING.value, JobState.QUEUED.value, JobState.RUNNING.value})


def cancel_unfinished_predecessor(s: Session, job_id: str, now: datetime) -> bool:
    """In the caller's transaction: cancel ``job_id`` if it has not recorded results yet.

    Called when a newer version of the same study, rule and model is created. Results of the
    older input set that would be recorded after the newer job has looked for the result set
    it supersedes (:func:`dicom_node.jobs.lineage.result_lineage`) would stay current in the
    PACS beside the new ones; cancelled now, a running attempt loses its lease and records
    nothing. A job already ``delivering`` has recorded its results and is superseded (and
    withdrawn) the ordinary way.
    """
    job = s.get(Job, job_id, with_for_update=True)
    if job is None or job.state not in _NO_RESULTS_YET:
        return False
    _cancel_row(s, job, SUPERSEDED_UNFINISHED, now)
    return True


def _cancel_row(s: Session, job: Job, reason: str, now: datetime) -> None:
    job.state = JobState.CANCELLED.value
    job.reason = reason
    job.finished_at = now
    job.updated_at = now
    job.lease_owner = None
    job.lease_expires_at = None
    s.query(Outbox).filter(Outbox.job_id == job.id).delete()


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
    """The opaque study key of a job (for log context and audit), or ``None``."""
    with db.session() as s:
        return s.scalar(
            select(Study.study_key).join(Job, Job.study_id == Study.id).where(Job.id == job_id)
        )
