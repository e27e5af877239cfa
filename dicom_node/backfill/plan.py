"""What to do with each study found at the source.

A study is pulled unless the node can show it already did the work:

* **done**: every instance the source holds is in the node's index (or is one of the node's
  own results written back there), and the jobs of the study's last version are all terminal,
  each run with the model version this node's workers run now (the newest version recorded for
  that model);
* **in-progress**: all its instances are here but it is not finished (waiting for its quiet
  period, or jobs queued or running);
* **stale**: done, but by an older version of a model than the one running now. Pulling the
  same instances again would not run it again (a job is unique per input set, rule and
  model), so it is reported, not pulled;
* **pull**: anything else (unknown to the node, or instances missing).

The cheap test runs first: a study the index does not know is pulled without asking the source
for its instance list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import func, select

from dicom_node.backfill.query import RemoteStudy
from dicom_node.completion import NO_RULE
from dicom_node.state import Database, Instance, Job, JobState, Output, Study


class Action(str, Enum):
    PULL = "pull"
    DONE = "done"
    IN_PROGRESS = "in-progress"
    STALE = "stale"


@dataclass(frozen=True)
class PlannedStudy:
    remote: RemoteStudy
    action: Action
    reason: str
    """Patient-free, e.g. "not at the node" or "3 instances missing"."""


def plan_studies(
    db: Database,
    studies: list[RemoteStudy],
    remote_instances: Callable[[str], set[str]],
) -> list[PlannedStudy]:
    """Classify ``studies``; ``remote_instances(study_uid)`` lists one study's SOP Instance UIDs
    at the source (asked only for studies the node already knows)."""
    current = current_model_versions(db)
    planned = []
    for remote in studies:
        planned.append(_plan_one(db, remote, remote_instances, current))
    return planned


def current_model_versions(db: Database) -> dict[str, str]:
    """Model -> the version of its most recently finished job: what the workers run now."""
    with db.session() as s:
        rows = s.execute(
            select(Job.model, Job.model_version, Job.finished_at)
            .where(Job.model_version.is_not(None), Job.finished_at.is_not(None))
            .order_by(Job.finished_at)
        ).all()
    return {model: version for model, version, _ in rows if version is not None}


def _plan_one(
    db: Database,
    remote: RemoteStudy,
    remote_instances: Callable[[str], set[str]],
    current: dict[str, str],
) -> PlannedStudy:
    uid = remote.study_instance_uid
    with db.session() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
        if study is None:
            return PlannedStudy(remote, Action.PULL, "not at the node")
        local_count = s.scalar(
            select(func.count()).select_from(Instance).where(Instance.study_id == study.id)
        )
        study_id, version, dirty = study.id, study.version, study.dirty
    if remote.instances is not None and remote.instances <= (local_count or 0):
        missing = 0  # as many here as there (the node's results there make "there" larger)
    else:
        missing = len(_missing(db, study_id, remote_instances(uid)))
    if missing:
        return PlannedStudy(remote, Action.PULL, f"{missing} instance(s) not at the node")
    if dirty:
        return PlannedStudy(remote, Action.IN_PROGRESS, "waiting for its quiet period")
    with db.session() as s:
        jobs = s.execute(
            select(Job.model, Job.model_version, Job.state).where(
                Job.study_id == study_id, Job.study_version == version
            )
        ).all()
    if not jobs:
        return PlannedStudy(remote, Action.IN_PROGRESS, "not yet completed")
    if any(not JobState(state).terminal for _, _, state in jobs):
        return PlannedStudy(remote, Action.IN_PROGRESS, "jobs not finished")
    older = sorted(
        {
            f"{model} {found}"
            for model, found, state in jobs
            if model != NO_RULE
            and state == JobState.DONE.value
            and found is not None
            and current.get(model, found) != found
        }
    )
    if older:
        return PlannedStudy(remote, Action.STALE, "processed by " + ", ".join(older))
    states = sorted({state for _, _, state in jobs})
    return PlannedStudy(remote, Action.DONE, "jobs " + ", ".join(states))


def _missing(db: Database, study_id: int, remote: set[str]) -> set[str]:
    """The source's instances the node neither received nor produced."""
    if not remote:
        return set()
    with db.session() as s:
        here = set(
            s.scalars(select(Instance.sop_instance_uid).where(Instance.study_id == study_id))
        )
        ours = set(
            s.scalars(
                select(Output.sop_instance_uid)
                .join(Job, Output.job_id == Job.id)
                .where(Job.study_id == study_id, Output.sop_instance_uid.is_not(None))
            )
        )
    return remote - here - ours
