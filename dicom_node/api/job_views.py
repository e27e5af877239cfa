"""Job views: the patient-free JSON form of a job, shared by ``/api/jobs`` (routes/jobs.py),
the dashboard, ``dicom-node jobs`` and the demo. The job's state transitions live in
:mod:`dicom_node.jobs`; this module only reads."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from dicom_node.state import Delivery, Job, Study


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def job_view(job: Job, study: Study, *, detail: bool = False) -> dict[str, Any]:
    """``job`` as JSON; ``detail`` adds the Study Instance UID, inputs, lease, summary, outputs
    and deliveries (the ``GET /api/jobs/{id}`` form)."""
    view: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "reason": job.reason,
        "study": {
            "key": study.study_key,
            "version": job.study_version,
            "instances": job.input_count,
        },
        "rule": job.rule,
        "model": job.model,
        "model_version": job.model_version,
        "queue": job.queue,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "created_at": _iso(job.created_at),
        "queued_at": _iso(job.queued_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "updated_at": _iso(job.updated_at),
        "timings": job.timings or {},
        "supersedes": job.supersedes_id,
        "findings": (job.summary or {}).get("finding_count"),
    }
    if detail:
        view["study"]["study_instance_uid"] = study.study_instance_uid
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
    limit: int = 100,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Jobs newest first; ``since`` inclusive, ``until`` exclusive (creation time). Each item
    has ``deliveries``: the state of its delivery to each destination (name -> state)."""
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
