"""Study completion: a study is complete after ``stable_seconds`` without a new instance.

The timer lives in the state database (``studies.dirty`` and ``last_received_at``), so a node
restarted during the quiet period still completes the study. Completing a study routes it and,
in one transaction, writes the job rows and their dispatch (outbox) records. An instance that
arrives later marks the study dirty again; the next completion creates new jobs for the new input
set, which supersede the earlier ones (kept, and linked by ``supersedes_id``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.broker import DEFAULT_QUEUE
from dicom_node.jobs import JobSpec, cancel_unfinished_predecessor, create_job
from dicom_node.routing import SeriesFacts, route
from dicom_node.settings import Settings
from dicom_node.state import Database, Instance, Job, Series, Study, utcnow
from dicom_node.uids import input_set_hash

LOGGER = logging.getLogger(__name__)

NO_RULE = "-"
"""Rule and model name recorded on the skipped job of a study no rule matched."""


def due_studies(db: Database, stable_seconds: float, now: datetime | None = None) -> list[int]:
    """Ids of studies that have been quiet for ``stable_seconds`` and have unseen instances."""
    cutoff = (now or utcnow()) - timedelta(seconds=stable_seconds)
    with db.session() as s:
        return list(
            s.scalars(
                select(Study.id)
                .where(Study.dirty.is_(True), Study.last_received_at <= cutoff)
                .order_by(Study.last_received_at)
                .limit(500)
            )
        )


def complete_due_studies(
    db: Database, settings: Settings, now: datetime | None = None
) -> list[str]:
    """Complete every due study; returns the ids of the jobs created."""
    created: list[str] = []
    for study_id in due_studies(db, settings.stable_seconds, now):
        try:
            created.extend(complete_study(db, settings, study_id, now))
        except Exception:
            LOGGER.exception("completing study id %d failed; will retry", study_id)
    return created


def model_queue(settings: Settings, model: str) -> str:
    cfg = settings.models.get(model)
    return (cfg.queue if cfg and cfg.queue else None) or DEFAULT_QUEUE


def _series_facts(s: Session, study: Study) -> list[SeriesFacts]:
    facts = []
    rows = s.execute(
        select(
            Series,
            func.count(Instance.id),
            func.coalesce(func.sum(func.coalesce(Instance.number_of_frames, 1)), 0),
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id, Instance.purged_at.is_(None))
        .group_by(Series.id)
    ).all()
    for series, _count, frames in rows:
        classes = set(
            s.scalars(
                select(Instance.sop_class_uid).where(Instance.series_id == series.id).distinct()
            )
        )
        callers = {
            c
            for c in s.scalars(
                select(Instance.calling_ae_title).where(Instance.series_id == series.id).distinct()
            )
            if c
        }
        facts.append(
            SeriesFacts(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                body_part=series.body_part,
                series_description=series.series_description,
                study_description=series.study_description,
                manufacturer=series.manufacturer,
                sop_class_uids=frozenset(classes),
                calling_ae_titles=frozenset(callers),
                slice_count=int(frames),
                slice_thickness=series.slice_thickness,
            )
        )
    return facts


def complete_study(
    db: Database, settings: Settings, study_id: int, now: datetime | None = None
) -> list[str]:
    """Route a quiet study and create its jobs + outbox records in one transaction."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.stable_seconds)
    created: list[str] = []
    audit_events: list[tuple[str, str, dict[str, str]]] = []
    with db.session() as s:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None or not study.dirty or study.last_received_at > cutoff:
            return []
        pairs = s.execute(
            # What is still on disk: a late instance of a study whose files retention removed
            # makes a new version over the instances that can be read (dicom_node.retention).
            select(Instance.sop_instance_uid, Instance.sha256).where(
                Instance.study_id == study.id, Instance.purged_at.is_(None)
            )
        ).all()
        input_hash = input_set_hash(f"{uid}:{sha}" for uid, sha in pairs)
        facts = _series_facts(s, study)
        result = route(settings.effective_routes(), facts, list(settings.all_destinations()))
        version = study.version + 1
        decisions = result.decisions
        unrouted = JobSpec(
            study_id=study.id,
            study_instance_uid=study.study_instance_uid,
            study_version=version,
            input_hash=input_hash,
            input_count=len(pairs),
            rule=NO_RULE,
            model=NO_RULE,
            queue=DEFAULT_QUEUE,
            max_attempts=settings.worker.max_attempts,
        )
        if not decisions:
            spec = unrouted
            reason = result.skip_reason()[:2000]
            if (job_id := create_job(s, spec, now, skipped_reason=reason)) is not None:
                created.append(job_id)
                audit_events.append((job_id, "skipped", {"reason": "no routing rule matched"}))
        for decision in decisions:
            previous = s.scalar(
                select(Job.id)
                .where(
                    Job.study_id == study.id, Job.rule == decision.rule, Job.model == decision.model
                )
                .order_by(Job.created_at.desc())
                .limit(1)
            )
            spec = replace(
                unrouted,
                rule=decision.rule,
                model=decision.model,
                queue=model_queue(settings, decision.model),
                series_uids=list(decision.series_uids),
                destinations=list(decision.destinations),
                supersedes_id=previous,
                priority=decision.priority,
            )
            job_id = create_job(s, spec, now)
            if job_id is None:
                continue  # this exact input set was already routed (e.g. an identical resend)
            created.append(job_id)
            audit_events.append(
                (
                    job_id,
                    "waiting",
                    {"rule": decision.rule, "model": decision.model, "supersedes": previous or "-"},
                )
            )
            # The older input set's job has no results yet: they would be stale the moment they
            # were recorded, and the new job would not know to withdraw them.
            if previous is not None and cancel_unfinished_predecessor(s, previous, now):
                audit_events.append((previous, "cancelled", {"reason": "superseded"}))
        study.dirty = False
        study.completed_at = now
        study.version = version
        study_key = study.study_key
        instance_count = len(pairs)
    audit.record(
        db,
        audit.STUDY_COMPLETED,
        actor="node",
        study_key=study_key,
        instances=instance_count,
        version=version,
        jobs=len(created),
    )
    for job_id, state, detail in audit_events:
        audit.record(
            db,
            audit.JOB_STATE,
            actor="node",
            study_key=study_key,
            job_id=job_id,
            state=state,
            **detail,
        )
    return created
