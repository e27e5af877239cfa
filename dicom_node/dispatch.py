"""The outbox dispatcher: turns dispatch records into Celery messages.

A job row and its outbox record are written in one transaction (by completion, retries and the
reconciler). The dispatcher sends the message, then deletes the record. If the broker is down,
the record stays and is sent once the broker is back: ingest never depends on the broker.
A crash between send and delete sends the message twice, which the job claim makes harmless.

Due records go out by job priority (``stat``, then ``routine`` — also a job from before
priorities, NULL —, then ``research``), oldest first within one priority, and each message
carries its job's priority for the broker (:func:`dicom_node.broker.publish_job`).
"""

from __future__ import annotations

import logging
from datetime import datetime

from celery import Celery
from sqlalchemy import case, or_, select, update

from dicom_node.broker import publish_job
from dicom_node.state import Database, Job, JobState, Outbox, utcnow

LOGGER = logging.getLogger(__name__)

BATCH = 200

PRIORITY_ORDER = case(
    (Job.priority == "stat", 0), (Job.priority == "research", 2), else_=1
)
"""Sort key of a job's priority at dispatch (NULL: a job from before priorities, routine)."""


class Dispatcher:
    """Sends due outbox records; ``run_once`` is called by the node's background loop."""

    def __init__(self, db: Database, app: Celery) -> None:
        self.db = db
        self.app = app
        self.broker_ok = True
        self.last_error: str | None = None

    def run_once(self, now: datetime | None = None) -> int:
        now = now or utcnow()
        with self.db.session() as s:
            rows = list(
                s.execute(
                    select(
                        Outbox.id,
                        Outbox.job_id,
                        Outbox.task,
                        Outbox.queue,
                        Job.dispatch_count,
                        Job.priority,
                    )
                    .join(Job, Job.id == Outbox.job_id)
                    .where(or_(Outbox.not_before.is_(None), Outbox.not_before <= now))
                    .order_by(PRIORITY_ORDER, Outbox.id)
                    .limit(BATCH)
                ).all()
            )
        sent = 0
        for outbox_id, job_id, task, queue, count, priority in rows:
            task_id = f"job-{job_id}-{count + 1}"
            try:
                publish_job(
                    self.app, task, job_id, queue=queue, task_id=task_id, priority=priority
                )
            except Exception as exc:
                self._broker_failed(outbox_id, exc)
                break  # the broker is down: keep the rest for the next round
            self.broker_ok = True
            self.last_error = None
            sent += 1
            sent_at = utcnow()
            with self.db.session() as s:
                s.query(Outbox).filter(Outbox.id == outbox_id).delete()
                # Conditional, atomic updates: a worker may already have claimed the job in the
                # moment since the message went out; a read-modify-write here would undo that.
                s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(dispatch_count=Job.dispatch_count + 1, updated_at=sent_at)
                )
                s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.state.in_([JobState.WAITING.value, JobState.QUEUED.value]))
                    .values(state=JobState.QUEUED.value, queued_at=sent_at)
                )
        return sent

    def _broker_failed(self, outbox_id: int, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {str(exc)[:200]}"
        if self.broker_ok:
            LOGGER.warning("broker unavailable, jobs wait in the outbox: %s", message)
        self.broker_ok = False
        self.last_error = message
        with self.db.session() as s:
            row = s.get(Outbox, outbox_id)
            if row is not None:
                row.attempts += 1
                row.last_error = message
