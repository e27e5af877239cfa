"""What a lease holder records: a job's outputs (and with them its deliveries), and each
delivery attempt. Every function checks, in the transaction that writes, that the caller still
holds the job's lease (:func:`dicom_node.jobs.lease.held_job`) and returns ``False`` otherwise:
a worker whose lease was taken over can write neither outputs nor delivery state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from sqlalchemy import select

from dicom_node.broker import DELIVER_TASK, DELIVERY_QUEUE
from dicom_node.jobs.lease import held_job
from dicom_node.phi import reason_text
from dicom_node.state import Database, Delivery, DeliveryState, JobState, Outbox, Output, utcnow


@dataclass(frozen=True)
class OutputRecord:
    """One stored result file of a job (its bytes are in the central result store)."""

    kind: str  # sr | seg | sr-volumetric | summary ...
    path: str
    """Relative to the results directory (:mod:`dicom_node.results_store`)."""
    size: int
    sha256: str
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None


class Recorded(str, Enum):
    DELIVERING = "delivering"  # deliveries opened; a delivery message is in the outbox
    DONE = "done"  # nothing to deliver to
    LEASE_LOST = "lease-lost"


def record_outputs(
    db: Database,
    job_id: str,
    owner: str,
    outputs: list[OutputRecord],
    *,
    summary: dict[str, Any],
    timings: dict[str, float],
    lease_seconds: float | None = None,
) -> Recorded:
    """Record a running job's stored outputs and hand it to delivery, in one transaction.

    Output rows are added or updated (a re-run writes the same UIDs), one delivery is opened per
    destination of the job that has none yet, and the job moves to ``delivering`` with its lease
    released and a delivery message in the outbox for the ``delivery`` queue (consumed where the
    result store is). With ``lease_seconds`` the caller keeps the lease instead, to deliver at
    once itself (a worker that shares the store); if it dies, the lease expires and the
    reconciler hands the delivery to the ``delivery`` queue. A job without destinations is
    ``done``.
    """
    now = utcnow()
    with db.session() as s:
        job = held_job(s, job_id, owner, (JobState.RUNNING.value,))
        if job is None:
            return Recorded.LEASE_LOST
        existing = {(o.kind, o.sop_instance_uid): o for o in job.outputs}
        for item in outputs:
            row = existing.get((item.kind, item.sop_instance_uid))
            if row is None:
                s.add(
                    Output(
                        job_id=job_id,
                        kind=item.kind,
                        sop_class_uid=item.sop_class_uid,
                        sop_instance_uid=item.sop_instance_uid,
                        series_instance_uid=item.series_instance_uid,
                        path=item.path,
                        size=item.size,
                        sha256=item.sha256,
                        created_at=now,
                    )
                )
            else:
                row.path, row.size, row.sha256 = item.path, item.size, item.sha256
        have = {d.destination for d in job.deliveries}
        for name in job.destinations or []:
            if name not in have:
                s.add(
                    Delivery(
                        job_id=job_id,
                        destination=name,
                        state=DeliveryState.PENDING.value,
                        attempts=0,
                    )
                )
        job.summary = summary
        job.timings = {**(job.timings or {}), **timings}
        job.reason = None
        job.updated_at = now
        if not job.destinations:
            job.state = JobState.DONE.value
            job.finished_at = now
            job.lease_owner = None
            job.lease_expires_at = None
            return Recorded.DONE
        job.state = JobState.DELIVERING.value
        if lease_seconds is not None:
            job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            return Recorded.DELIVERING
        job.lease_owner = None
        job.lease_expires_at = None
        s.add(
            Outbox(
                job_id=job_id,
                task=DELIVER_TASK,
                queue=DELIVERY_QUEUE,
                created_at=now,
                not_before=now,
                attempts=0,
            )
        )
        return Recorded.DELIVERING


@dataclass(frozen=True)
class StoredOutput:
    kind: str
    path: str
    size: int
    sha256: str


def outputs_of(db: Database, job_id: str) -> list[StoredOutput]:
    """The recorded outputs of a job, in the order they were recorded."""
    with db.session() as s:
        return [
            StoredOutput(o.kind, o.path, o.size, o.sha256)
            for o in s.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.id))
        ]


@dataclass(frozen=True)
class OpenDelivery:
    """A delivery that still has to succeed: pending, or waiting to retry."""

    id: int
    destination: str
    attempts: int
    next_attempt_at: datetime | None


def open_deliveries(db: Database, job_id: str) -> list[OpenDelivery]:
    """The job's deliveries that are pending or waiting to retry."""
    waiting = (DeliveryState.PENDING.value, DeliveryState.RETRY.value)
    with db.session() as s:
        return [
            OpenDelivery(d.id, d.destination, d.attempts, d.next_attempt_at)
            for d in s.scalars(
                select(Delivery).where(Delivery.job_id == job_id, Delivery.state.in_(waiting))
            )
        ]


def record_attempt(
    db: Database,
    job_id: str,
    owner: str,
    delivery_id: int,
    state: DeliveryState,
    attempts: int,
    error: str | None = None,
    *,
    next_attempt: datetime | None = None,
) -> bool:
    """Record the outcome of one delivery attempt of a job we hold in ``delivering``."""
    with db.session() as s:
        if held_job(s, job_id, owner, (JobState.DELIVERING.value,)) is None:
            return False
        d = s.get(Delivery, delivery_id)
        if d is None or d.job_id != job_id:
            return False
        d.state = state.value
        d.attempts = attempts
        d.last_error = reason_text(error) if error else None
        d.next_attempt_at = next_attempt
        if state is DeliveryState.DONE:
            d.delivered_at = utcnow()
        return True


@dataclass(frozen=True)
class DeliveryStatus:
    destination: str
    state: str
    next_attempt_at: datetime | None
    last_error: str | None


def delivery_status(db: Database, job_id: str) -> list[DeliveryStatus]:
    """Every delivery of a job with its state, for settling the job after a round."""
    with db.session() as s:
        return [
            DeliveryStatus(d.destination, d.state, d.next_attempt_at, d.last_error)
            for d in s.scalars(select(Delivery).where(Delivery.job_id == job_id))
        ]
