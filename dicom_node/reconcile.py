"""The reconciler: repairs what the broker lost and what dead workers left behind.

Every ``reconcile_interval`` seconds it adds an outbox record (a new message) for

* a job still *queued* long after it was sent — its message was lost (Redis restarted empty,
  a worker stopped consuming); the wait before re-sending doubles with each re-send, so a long
  backlog is not flooded with duplicates;
* a job *running* or *delivering* whose lease expired — its worker died;
* a *waiting* job with no outbox record (should not happen; repaired anyway).

Re-sent messages are harmless when the original arrives too: the job claim lets only one run.
Time to recover from a dead worker is therefore at most ``lease_seconds + reconcile_interval``
plus the time for a worker to pick the message up.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, or_, select

from dicom_node.broker import DELIVER_TASK, DELIVERY_QUEUE, RUN_JOB_TASK
from dicom_node.settings import Settings
from dicom_node.state import Database, Job, JobState, Outbox, utcnow

LOGGER = logging.getLogger(__name__)


def reconcile(db: Database, settings: Settings, now: datetime | None = None) -> list[str]:
    """One pass; returns the ids of the jobs re-dispatched."""
    now = now or utcnow()
    queued_timeout = settings.worker.queued_timeout
    has_outbox = exists().where(Outbox.job_id == Job.id)
    repaired: list[str] = []
    with db.session() as s:
        candidates = s.execute(
            select(
                Job.id,
                Job.state,
                Job.queue,
                Job.queued_at,
                Job.dispatch_count,
                Job.lease_owner,
                Job.updated_at,
            )
            .where(~has_outbox)
            .where(
                or_(
                    Job.state == JobState.WAITING.value,
                    Job.state == JobState.QUEUED.value,
                    and_(Job.state == JobState.DELIVERING.value, Job.lease_owner.is_(None)),
                    and_(
                        Job.state.in_([JobState.RUNNING.value, JobState.DELIVERING.value]),
                        Job.lease_owner.is_not(None),
                        Job.lease_expires_at < now,
                    ),
                )
            )
            .limit(1000)
        ).all()
        for job_id, state, queue, queued_at, dispatch_count, owner, updated_at in candidates:
            if state == JobState.DELIVERING.value and owner is None:
                # parked between delivery attempts, but its wake-up message was lost
                if updated_at > now - timedelta(seconds=queued_timeout):
                    continue
                why = "delivery retry message lost"
            elif state == JobState.QUEUED.value:
                backoff = queued_timeout * (2 ** min(max((dispatch_count or 1) - 1, 0), 6))
                if queued_at is not None and queued_at > now - timedelta(seconds=backoff):
                    continue
                why = "queued too long (message lost?)"
            elif state == JobState.WAITING.value:
                why = "waiting without a dispatch record"
            else:
                why = "lease expired (worker lost)"
            task, target = (
                (DELIVER_TASK, DELIVERY_QUEUE)
                if state == JobState.DELIVERING.value
                else (RUN_JOB_TASK, queue)
            )
            s.add(Outbox(job_id=job_id, task=task, queue=target, created_at=now, attempts=0))
            repaired.append(job_id)
            LOGGER.info("re-dispatching job %s: %s", job_id, why)
    return repaired
