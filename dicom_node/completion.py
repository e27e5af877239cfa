"""Study completion: a study is complete after ``stable_seconds`` without a new instance.

The timer lives in the state database (``studies.dirty`` and ``last_received_at``), so a node
restarted during the quiet period still completes the study. Completing a study routes it and,
in one transaction, writes the job rows and their dispatch (outbox) records. An instance that
arrives later marks the study dirty again; the next completion creates new jobs for the new input
set, which supersede the earlier ones (kept, and linked by ``supersedes_id``).

:func:`rerun_study` routes a completed study's input set again, with no new instance: for a rule
or model added since, or a model version the workers run now that differs from the one its jobs
ran (``dicom-node backfill``, :mod:`dicom_node.backfill`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.broker import DEFAULT_QUEUE
from dicom_node.jobs import JobSpec, cancel_unfinished_predecessor, create_job
from dicom_node.routing import RouteDecision, RoutingResult, SeriesFacts, route
from dicom_node.settings import Settings
from dicom_node.state import Database, Instance, Job, JobState, Series, Study, utcnow
from dicom_node.state.model_versions import current_versions
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


def _route_input_set(
    s: Session, settings: Settings, study: Study, version: int
) -> tuple[RoutingResult, JobSpec]:
    """Route the study's current input set: the routing result and the job spec of that set
    with no rule yet (``NO_RULE``), for study version ``version``."""
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
    return result, unrouted


def _latest_job(s: Session, study_id: int, rule: str, model: str) -> str | None:
    """The study's newest job for ``rule`` and ``model`` (what a new one supersedes)."""
    return s.scalar(
        select(Job.id)
        .where(Job.study_id == study_id, Job.rule == rule, Job.model == model)
        .order_by(Job.created_at.desc(), Job.generation.desc())
        .limit(1)
    )


def _decision_spec(
    settings: Settings,
    unrouted: JobSpec,
    decision: RouteDecision,
    previous: str | None,
    generation: int = 0,
) -> JobSpec:
    return replace(
        unrouted,
        rule=decision.rule,
        model=decision.model,
        queue=model_queue(settings, decision.model),
        series_uids=list(decision.series_uids),
        destinations=list(decision.destinations),
        supersedes_id=previous,
        priority=decision.priority,
        generation=generation,
    )


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
        version = study.version + 1
        result, unrouted = _route_input_set(s, settings, study, version)
        decisions = result.decisions
        if not decisions:
            spec = unrouted
            reason = result.skip_reason()[:2000]
            if (job_id := create_job(s, spec, now, skipped_reason=reason)) is not None:
                created.append(job_id)
                audit_events.append((job_id, "skipped", {"reason": "no routing rule matched"}))
        for decision in decisions:
            previous = _latest_job(s, study.id, decision.rule, decision.model)
            spec = _decision_spec(settings, unrouted, decision, previous)
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
        instance_count = unrouted.input_count
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


# -- re-runs -------------------------------------------------------------------------------------

NEW_RULE = "new-rule"
"""A rule and model routing now picks for the input set had no job for it (a rule or model
added since the study completed)."""
NEW_VERSION = "new-version"
"""The input set's job for a rule and model ran another version than the workers run now."""


@dataclass(frozen=True)
class Rerun:
    """One job a re-run of a study's current input set makes (:func:`reruns_due`)."""

    rule: str
    model: str
    why: str
    """:data:`NEW_RULE` or :data:`NEW_VERSION`."""
    generation: int
    supersedes_id: str | None
    ran_version: str | None = None
    """The model version the superseded job ran (:data:`NEW_VERSION`)."""
    current_version: str | None = None

    def describe(self) -> str:
        """Patient-free, e.g. ``"ct/test-slow 1.0.0 -> 2.0.0"`` or ``"ct/test-slow: no job yet"``."""
        if self.why == NEW_VERSION:
            return f"{self.rule}/{self.model} {self.ran_version} -> {self.current_version}"
        return f"{self.rule}/{self.model}: no job yet"


def reruns_due(
    db: Database, settings: Settings, study_id: int, current: dict[str, str] | None = None
) -> list[Rerun]:
    """What :func:`rerun_study` would create for ``study_id`` now, creating nothing.

    ``current``: model -> the version the workers run (default:
    :func:`dicom_node.state.model_versions.current_versions`)."""
    if current is None:
        current = current_versions(db)
    with db.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            return []
        return [r for r, _ in _reruns(s, settings, study, current)]


def rerun_study(
    db: Database,
    settings: Settings,
    study_id: int,
    *,
    reason: str,
    actor: str = "node",
    current: dict[str, str] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Route a completed study's current input set again and create the jobs it lacks.

    For each rule and model routing picks now (with the settings of now):

    * no job for this input set yet (a rule or model added since): a generation-0 job, as
      completion would have made;
    * its newest job is ``done`` with another model version than the workers run now
      (``current``, default :func:`~dicom_node.state.model_versions.current_versions`): a job
      of the next generation, superseding it (``supersedes_id``), so its results replace the
      older ones in the PACS the way a new input set's do (:mod:`dicom_node.jobs.lineage`:
      rejection note, or deletion where the destination asks for it).

    The study's version does not change (same input set). Nothing is done for a study that is
    waiting for its quiet period, was never completed, or whose instances on disk are no
    longer the input set its jobs ran on (retention removed files). Audited: a
    ``study-rerun`` record with ``reason`` (patient-free) and one ``job-state`` per job.
    Returns the ids of the jobs created."""
    now = now or utcnow()
    if current is None:
        current = current_versions(db)
    created: list[str] = []
    events: list[tuple[str, dict[str, str]]] = []
    with db.session() as s:
        study = s.get(Study, study_id, with_for_update=True)
        if study is None:
            return []
        for rerun, spec in _reruns(s, settings, study, current):
            job_id = create_job(s, spec, now)
            if job_id is None:
                continue
            created.append(job_id)
            detail = {"rule": rerun.rule, "model": rerun.model, "rerun": rerun.why}
            detail |= {
                "supersedes": rerun.supersedes_id or "-",
                "generation": str(rerun.generation),
            }
            events.append((job_id, detail))
            if rerun.supersedes_id is not None and cancel_unfinished_predecessor(
                s, rerun.supersedes_id, now
            ):
                events.append((rerun.supersedes_id, {"state": "cancelled", "reason": "superseded"}))
        study_key = study.study_key
    if not created:
        return []
    audit.record(
        db,
        audit.STUDY_RERUN,
        actor=actor,
        study_key=study_key,
        reason=reason,
        jobs=len(created),
    )
    for job_id, detail in events:
        audit.record(
            db,
            audit.JOB_STATE,
            actor=actor,
            study_key=study_key,
            job_id=job_id,
            **({"state": "waiting"} | detail),
        )
    return created


def _reruns(
    s: Session, settings: Settings, study: Study, current: dict[str, str]
) -> list[tuple[Rerun, JobSpec]]:
    if study.dirty or study.version < 1:
        return []
    result, unrouted = _route_input_set(s, settings, study, study.version)
    jobs = s.scalars(
        select(Job)
        .where(Job.study_id == study.id, Job.input_hash == unrouted.input_hash)
        .order_by(Job.generation.desc())
    ).all()
    if not jobs:
        return []  # not the input set its jobs ran on (files removed since): nothing to re-run
    out = []
    for decision in result.decisions:
        mine = [j for j in jobs if (j.rule, j.model) == (decision.rule, decision.model)]
        if not mine:
            previous = _latest_job(s, study.id, decision.rule, decision.model)
            rerun = Rerun(decision.rule, decision.model, NEW_RULE, 0, previous)
        else:
            latest = mine[0]
            wanted = current.get(decision.model)
            if (
                latest.state != JobState.DONE.value
                or latest.model_version is None
                or wanted is None
                or wanted == latest.model_version
            ):
                continue
            rerun = Rerun(
                decision.rule,
                decision.model,
                NEW_VERSION,
                latest.generation + 1,
                latest.id,
                latest.model_version,
                wanted,
            )
        spec = _decision_spec(settings, unrouted, decision, rerun.supersedes_id, rerun.generation)
        out.append((rerun, spec))
    return out
