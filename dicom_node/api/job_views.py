"""Job views: the patient-free JSON form of a job, shared by ``/api/jobs`` (routes/jobs.py),
the dashboard, ``dicom-node jobs`` and the demo, and the study lookup behind
``/api/studies`` (routes/studies.py). The job's state transitions live in
:mod:`dicom_node.jobs`; this module only reads (and audits lookups)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session, selectinload

from dicom_node import study_lookup
from dicom_node.state import Database, Delivery, Job, Study
from dicom_node.study_lookup import LookupKind


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_view(job: Job, study: Study, *, detail: bool = False) -> dict[str, Any]:
    """``job`` as JSON, with its study's key and Study Instance UID; ``detail`` adds the
    inputs, lease, summary, outputs and deliveries (the ``GET /api/jobs/{id}`` form)."""
    view: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "reason": job.reason,
        "study": {
            "key": study.study_key,
            "study_instance_uid": study.study_instance_uid,
            "version": job.study_version,
            "instances": job.input_count,
        },
        "rule": job.rule,
        "model": job.model,
        "model_version": job.model_version,
        "queue": job.queue,
        "priority": job.priority or "routine",  # NULL: made before priorities (routine)
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": _iso(job.created_at),
        "queued_at": _iso(job.queued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
        "timings": job.timings or {},
        "supersedes": job.supersedes_id,
        "rerun": job.generation,  # 0: the first run of this input set; n: its n-th re-run
        "findings": (job.summary or {}).get("finding_count"),
    }
    if detail:
        view["input_hash"] = job.input_hash
        view["series_instance_uids"] = job.series_uids
        view["lease"] = {"owner": job.lease_owner, "expires_at": _iso(job.lease_expires_at)}
        view["summary"] = job.summary or {}
        view["outputs"] = [
            {
                "kind": o.kind,
                "sop_class_uid": o.sop_class_uid,
                "sop_instance_uid": o.sop_instance_uid,
                "series_instance_uid": o.series_instance_uid,
                "size": o.size,
                "sha256": o.sha256,
            }
            for o in job.outputs
        ]
        view["deliveries"] = [
            {
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "next_attempt_at": _iso(d.next_attempt_at),
                "delivered_at": _iso(d.delivered_at),
                "error": d.last_error,
            }
            for d in job.deliveries
        ]
    return view


IDENTIFIER_ROLE: Literal["operator"] = "operator"
"""The lowest role that sees a study's identifiers (its Study Instance UID) and may search by
them; a ``viewer`` sees study keys only (docs/deployment.md, roles)."""


def for_reader(view: dict[str, Any], may_see_identifiers: bool) -> dict[str, Any]:
    """``view`` (of :func:`job_view`) as a reader may see it: without the Study and Series
    Instance UIDs unless ``may_see_identifiers``."""
    if may_see_identifiers:
        return view
    view = {k: v for k, v in view.items() if k != "series_instance_uids"}
    if isinstance(view.get("study"), dict):
        view["study"] = {k: v for k, v in view["study"].items() if k != "study_instance_uid"}
    return view


def _utc(value: datetime) -> datetime:
    # A date or time without zone from a query string means UTC (the database's clock).
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def list_jobs(
    s: Session,
    *,
    state: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    study_key: str | None = None,
    study_condition: ColumnElement[bool] | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Jobs newest first; ``since`` inclusive, ``until`` exclusive (creation time). Each item
    has ``deliveries``: the state of its delivery to each destination (name -> state).
    ``study_condition``: only jobs of the studies it selects (a lookup,
    :func:`dicom_node.study_lookup.study_condition`)."""
    q = select(Job, Study).join(Study, Study.id == Job.study_id)
    if state:
        q = q.where(Job.state == state)
    if model:
        q = q.where(Job.model == model)
    if since:
        q = q.where(Job.created_at >= _utc(since))
    if until:
        q = q.where(Job.created_at < _utc(until))
    if study_key:
        q = q.where(Study.study_key == study_key)
    if study_condition is not None:
        q = q.where(study_condition)
    q = q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    items = [job_view(job, study) for job, study in s.execute(q).all()]
    states: dict[str, dict[str, str]] = defaultdict(dict)
    if items:
        rows = s.execute(
            select(Delivery.job_id, Delivery.destination, Delivery.state)
            .where(Delivery.job_id.in_([i["id"] for i in items]))
            .order_by(Delivery.id)
        )
        for job_id, destination, delivery_state in rows:
            states[job_id][destination] = delivery_state
    for item in items:
        item["deliveries"] = states.get(item["id"], {})
    return items


def get_job(s: Session, job_id: str) -> dict[str, Any] | None:
    """The detailed view of job ``job_id``, or None when there is no such job."""
    row = s.execute(
        select(Job, Study)
        .join(Study, Study.id == Job.study_id)
        .where(Job.id == job_id)
        .options(selectinload(Job.outputs), selectinload(Job.deliveries))
    ).first()
    if row is None:
        return None
    return job_view(row[0], row[1], detail=True)


def receiving_studies(s: Session, limit: int = 20) -> list[dict[str, Any]]:
    """Studies still in their quiet period (instances arriving, no job yet), newest first."""
    rows = s.execute(
        select(
            Study.study_key, Study.instance_count, Study.first_received_at, Study.last_received_at
        )
        .where(Study.dirty.is_(True))
        .order_by(Study.last_received_at.desc())
        .limit(limit)
    ).all()
    return [
        {
            "key": key,
            "instances": count,
            "first_received_at": _iso(first),
            "last_received_at": _iso(last),
        }
        for key, count, first, last in rows
    ]


def matching_study_keys(s: Session, study_condition: ColumnElement[bool]) -> list[str]:
    """The keys of the studies a lookup selects (those without jobs yet included)."""
    return list(s.scalars(select(Study.study_key).where(study_condition).order_by(Study.id)))


def find_study_jobs(
    db: Database,
    kind: LookupKind,
    value: str,
    *,
    actor: str,
    via: str,
    state: str | None = None,
    model: str | None = None,
    limit: int = 1000,
) -> dict[str, Any]:
    """The jobs of the studies with identifier ``value`` of ``kind`` (exact match), newest
    first, as ``{"by": kind, "studies": [study keys], "jobs": [job views], "count": n}``.

    ``state`` and ``model`` narrow the jobs as in :func:`list_jobs`. Every lookup is audited
    (:func:`dicom_node.study_lookup.record_lookup`, without the identifier), also one that
    finds nothing: the question itself is a read of patient data.
    """
    condition = study_lookup.study_condition(db.salt, kind, value)
    with db.session() as s:
        keys = matching_study_keys(s, condition)
        items = (
            list_jobs(s, state=state, model=model, study_condition=condition, limit=limit)
            if keys
            else []
        )
    study_lookup.record_lookup(db, kind, actor=actor, via=via, jobs=len(items), study_keys=keys)
    return {"by": kind.value, "studies": keys, "jobs": items, "count": len(items)}


def resolve_job_id(s: Session, job_id: str) -> str | None:
    """``job_id`` itself, or the one job id it is a prefix of (the CLI prints short ids);
    None when no job, or more than one, matches."""
    if s.get(Job, job_id) is not None:
        return job_id
    if len(job_id) < 4:
        return None
    pattern = job_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    found = list(s.scalars(select(Job.id).where(Job.id.like(pattern, escape="\\")).limit(2)))
    return found[0] if len(found) == 1 else None
